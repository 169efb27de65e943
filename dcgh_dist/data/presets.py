"""Named datasets: where prepared benchmark datasets live, and training defaults per dataset.

``--dataset coco`` resolves to ``<data root>/coco`` where the data root is ``data.data_root``,
else ``$DCGH_DATA_ROOT``, else ``~/.cache/dcgh_dist``. The demo is generated on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DatasetPreset:
    dirname: str
    num_classes: int
    query: int  # query split size of the paper's protocol
    train: int  # training split size


DATASET_PRESETS: dict[str, DatasetPreset] = {
    "mirflickr25k": DatasetPreset("mirflickr25k", 24, 2000, 10000),
    "nuswide": DatasetPreset("nuswide", 21, 2100, 10500),
    "nuswide-top10": DatasetPreset("nuswide-top10", 10, 2100, 10500),
    "coco": DatasetPreset("coco", 80, 5000, 10000),
}

# Config overrides applied before the user's YAML and command line (which win).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # The demo trains a tiny CLIP from scratch on a CPU: from-scratch towers need a far larger
    # learning rate than the 1e-5 used to fine-tune pretrained CLIP.
    "demo": {
        "model": {"clip_preset": "tiny", "bits": 64},
        "optim": {"tower_lr": 5e-4, "head_lr": 1e-3, "weight_decay": 0.05},
        "data": {"batch_size": 64},
        "train": {"epochs": 8, "output_dir": "runs/demo"},
    },
}


def preset_path(name: str, data_root: str | None = None) -> str:
    from dcgh_dist.data.demo import default_data_root

    root = default_data_root(data_root)
    p = DATASET_PRESETS[name]
    uri = f"{root.rstrip('/')}/{p.dirname}"
    if not uri.startswith("s3://") and not os.path.isdir(uri):
        raise FileNotFoundError(
            f"dataset preset {name!r} expects a prepared dataset at {uri}; prepare it with "
            f"jobs/prepare_data.py or set DCGH_DATA_ROOT / data.data_root"
        )
    return uri
