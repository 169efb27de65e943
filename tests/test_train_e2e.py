"""A whole ``jobs/train.py`` run through ``main([...])`` on a real local Ray cluster."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_train_job_beats_untrained_baseline(tmp_path, demo_small, ray_cluster):
    import train as train_job  # jobs/train.py

    out = tmp_path / "run"
    result = train_job.main([
        "--dataset", demo_small, "--output-dir", str(out), "--epochs", "6", "--bits", "32",
        "--batch-size", "32",
        # the small demo, trained from scratch: the demo preset's optimiser settings
        "model.clip_preset=tiny", "optim.tower_lr=5e-4", "optim.weight_decay=0.05",
        "train.log_every=5",
    ])

    # outputs promised by the issue
    for name in ("config.yaml", "metrics.json", "pr_curve.png", "loss_curve.png",
                 "checkpoint/model.pt", "checkpoint/meta.json"):
        assert (out / name).exists(), name
    assert (out / "pr_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    base = metrics["untrained"]
    for key in ("map_i2t", "map_t2i", "map_i2i", "map_t2t", "ndcg@1000_i2t", "p@10_i2t"):
        assert key in metrics and key in base
    # mAP over the whole database: the trained model must clearly beat where it started
    for key in ("map_i2t", "map_t2i"):
        assert metrics[key] > base[key] + 0.08, (key, metrics[key], base[key])
    # the checkpoint carries the resolved config; model selection used val, recorded per epoch
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert meta["config"]["model"]["bits"] == 32
    assert len(metrics["history"]) == 6 and all("val_map" in h for h in metrics["history"])
    assert 1 <= metrics["selected_epoch"] <= 6
