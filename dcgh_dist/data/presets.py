"""Named datasets: where prepared benchmark datasets live, their protocol, and training defaults.

``--dataset coco`` resolves to ``<data root>/coco`` where the data root is ``data.data_root``,
else ``$DCGH_DATA_ROOT``, else ``~/.cache/dcgh_dist`` (a local directory or an ``s3://`` prefix).
``jobs/prepare_data.py --dataset coco --input RAW`` writes there by default, so the two commands
chain. The demo is generated on first use.

Split sizes are the paper's (DCGH, following DCMH): MIRFLICKR-25K 2,000 queries / 10,000 training
pairs, NUS-WIDE 2,100 / 10,500, MS-COCO 5,000 / 10,000, the rest the ``db`` split. ``val`` (model
selection: the best epoch is picked on val, never on the queries) is carved from the non-query
rows, half the size of the query split; it is part of the retrieval database like ``train``, so
the paper's query set, training set and database are unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dcgh_dist.config import DataConfig


@dataclass(frozen=True)
class DatasetPreset:
    dirname: str
    num_classes: int
    query: int  # query split size of the paper's protocol
    train: int  # training split size
    val: int = 0  # validation rows carved from the non-query rows (not in the paper)
    source: str = ""  # raw layout family read by jobs/prepare_data.py: mirflickr | nuswide | coco
    top_k: int | None = None  # NUS-WIDE: the k most frequent concepts are the classes
    title: str = ""


DATASET_PRESETS: dict[str, DatasetPreset] = {
    "mirflickr25k": DatasetPreset("mirflickr25k", 24, 2000, 10000, val=1000, source="mirflickr",
                                  title="MIRFLICKR-25K"),
    "nuswide": DatasetPreset("nuswide", 21, 2100, 10500, val=1050, source="nuswide", top_k=21,
                             title="NUS-WIDE (top 21 concepts)"),
    "nuswide-top10": DatasetPreset("nuswide-top10", 10, 2100, 10500, val=1050, source="nuswide", top_k=10,
                                   title="NUS-WIDE (top 10 concepts)"),
    "coco": DatasetPreset("coco", 80, 5000, 10000, val=2500, source="coco", title="MS-COCO 2017"),
}

# Config overrides applied before the user's YAML and command line (which win).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # The demo trains a tiny CLIP from scratch on a CPU: from-scratch towers need a far larger
    # learning rate than the 1e-5 used to fine-tune pretrained CLIP. It runs a fixed 16 epochs
    # of batches of 32 whose cosine schedule anneals to zero, and exports the best-val epoch:
    # early stopping on the 200 val rows stopped on noise (epoch 11 of 24 on one machine, 20 on
    # another) before the rate had decayed, and more, smaller steps beat more epochs. Unaugmented, its 104 MiB of preprocessed pairs are read once and stay in the
    # object store (README, demo results; docs/TRAINING.md).
    "demo": {
        "model": {"clip_preset": "tiny", "bits": 64},
        "optim": {"tower_lr": 5e-4, "head_lr": 1e-3, "weight_decay": 0.05},
        "data": {"batch_size": 32, "augment": False},
        "train": {"epochs": 16, "patience": 0, "output_dir": "runs/demo"},
        "daph": {"proxy_epochs": 8},
    },
    # The built-in feature dataset (dcgh_dist.data.demo_features): feature towers follow from its
    # dataset.json; 32 bits as the feature benchmarks are usually reported.
    "demo-features": {"model": {"bits": 32}, "train": {"output_dir": "runs/demo-features"}},
    # The benchmark datasets train with the authors' defaults (config.py); only the run
    # directory is per dataset, so runs on different datasets do not overwrite each other.
    **{name: {"train": {"output_dir": f"runs/{name}"}} for name in DATASET_PRESETS},
}


def preset_output_path(name: str, data_root: str | None = None) -> str:
    """Where the prepared dataset of preset ``name`` lives (whether or not it exists yet)."""
    from dcgh_dist.data.demo import default_data_root

    if name not in DATASET_PRESETS:
        raise ValueError(f"unknown dataset preset {name!r}; known: {sorted(DATASET_PRESETS)}")
    root = default_data_root(data_root)
    return f"{root.rstrip('/')}/{DATASET_PRESETS[name].dirname}"


def preset_path(name: str, data_root: str | None = None) -> str:
    """The prepared dataset of preset ``name``; FileNotFoundError (with the command) if absent.

    A local directory must hold a ``dataset.json`` (written last by jobs/prepare_data.py, so its
    absence means preparation did not finish) with the preset's number of classes. S3 prefixes are
    checked when the dataset is scanned, where the endpoint is known.
    """
    uri = preset_output_path(name, data_root)
    if uri.startswith("s3://"):
        return uri
    info_path = os.path.join(uri, "dataset.json")
    if not os.path.isfile(info_path):
        state = "holds no dataset.json (preparation unfinished?)" if os.path.isdir(uri) else "does not exist"
        raise FileNotFoundError(
            f"dataset preset {name!r} expects a prepared dataset at {uri}, which {state}; prepare it with "
            f"`python jobs/prepare_data.py --dataset {name} --input RAW_ROOT` (writes there by default), "
            "or set DCGH_DATA_ROOT / data.data_root to where it is"
        )
    from dcgh_dist.data.format import read_dataset_info

    info = read_dataset_info(uri)
    expected = DATASET_PRESETS[name].num_classes
    if info.num_classes != expected:
        raise ValueError(
            f"{uri} holds a dataset with {info.num_classes} classes but preset {name!r} has {expected}; "
            f"re-run `python jobs/prepare_data.py --dataset {name} --input RAW_ROOT --overwrite`"
        )
    return uri


def resolve_dataset(data: "DataConfig") -> str:
    """What every job's ``--dataset`` means: ``demo`` (generated on first use, from
    ``data.demo_size``/``demo_seed``), ``demo-features`` (generated, from ``demo_seed``), a preset name (prepared under the data root), a local
    directory, or an ``s3://`` URI. Checked here, before any cluster starts."""
    name = data.dataset
    if name == "demo":
        from dcgh_dist.data.demo import ensure_demo_dataset

        return ensure_demo_dataset(data.demo_size, data.demo_seed, data.data_root)
    if name == "demo-features":
        from dcgh_dist.data.demo import ensure_features_demo

        return ensure_features_demo(data.demo_seed, data.data_root)
    if name.startswith("s3://") or os.path.isdir(name):
        return name
    if name in DATASET_PRESETS:
        return preset_path(name, data.data_root)
    if os.path.exists(name):
        raise ValueError(f"dataset {name!r} is a file; give the dataset's directory (with dataset.json)")
    raise ValueError(
        f"dataset {name!r} is neither 'demo', 'demo-features', a known preset ({sorted(DATASET_PRESETS)}), "
        "an existing directory nor an s3:// URI"
    )
