"""Multi-worker training on a real local Ray cluster: DeepSpeed, resume, and S3 (moto).

(The exact equality of N workers and one process for the gathered loss is in
``test_distributed_loss.py``; these tests run the whole job.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from conftest import ListenerWatch
from dcgh_dist.train.runner import run_directory

REPO = Path(__file__).resolve().parents[1]

SMALL = ["--bits", "32", "--batch-size", "32", "model.clip_preset=tiny",
         "optim.tower_lr=1e-3", "optim.head_lr=3e-3", "train.log_every=5"]


@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_deepspeed_two_workers_zero2_bf16_then_resume(tmp_path, demo_small, ray_cluster):
    from dcgh_dist.jobs import train as train_job

    out = tmp_path / "ds"
    args = ["--dataset", demo_small, "--output-dir", str(out), "--num-workers", "2", "--skip-baseline",
            *SMALL, "train.engine=deepspeed", "train.precision=bf16", "train.zero_stage=2",
            "train.cpus_per_worker=1"]
    with ListenerWatch() as sockets:
        first = train_job.main([*args, "--epochs", "2"]).metrics
    # every socket the run opened (the workers' rendezvous store and gloo among them) is on loopback
    assert sockets.samples > 5 and sockets.seen
    assert not sockets.not_loopback(), sockets.not_loopback()
    steps = (600 // 2) // 32  # per worker: half the 600 training rows, full batches only
    assert [h["global_step"] for h in first["history"]] == [steps, 2 * steps]
    assert first["history"][-1]["loss_total"] < first["history"][0]["loss_total"]
    run_dir = Path(run_directory(str(out)))
    ckpts = sorted(p for p in run_dir.glob("checkpoint_*") if (p / "meta.json").exists())
    assert ckpts and all((p / "deepspeed").is_dir() for p in ckpts)  # per-rank ZeRO state
    # the exported weights are fp32 and load into a plain model
    from dcgh_dist.models.checkpoint import load_model

    model, meta = load_model(str(out / "checkpoint"))
    assert meta.config.train.engine == "deepspeed"
    assert all(p.dtype == torch.float32 for p in model.parameters())

    # --resume continues the same run: two more epochs, not four
    second = train_job.main([*args, "--epochs", "4", "--resume"]).metrics
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3, 4]
    assert second["history"][-1]["global_step"] == 4 * steps
    assert second["history"][:2] == first["history"]  # the first two epochs were not redone


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_train_from_s3_with_checkpoints_on_s3(tmp_path, demo_small, s3_server, ray_cluster):
    """Data read and checkpoints written through the same filesystem code as real S3."""
    from dcgh_dist.jobs import train as train_job

    from dcgh_dist.storage import resolve_filesystem

    endpoint, make_bucket = s3_server
    bucket = make_bucket("dcgh-train")
    fs, _ = resolve_filesystem(bucket, endpoint)
    pafs.copy_files(demo_small, "dcgh-train/datasets/demo", destination_filesystem=fs)

    out = tmp_path / "s3run"
    result = train_job.main([
        "--dataset", f"{bucket}/datasets/demo", "--output-dir", str(out), "--epochs", "2",
        "--skip-baseline", *SMALL, f"data.s3_endpoint={endpoint}", f"train.storage_path={bucket}/runs",
    ]).metrics
    assert result["dataset"] == f"{bucket}/datasets/demo"
    assert result["num_query"] == 120 and result["num_database"] == 1080
    run_dir = run_directory(str(out))
    assert run_dir.startswith(f"{bucket}/runs/")
    stored = [f.path for f in fs.get_file_info(pafs.FileSelector(run_dir.removeprefix("s3://"), recursive=True))]
    assert any(p.endswith("/model.pt") for p in stored), stored
    assert any(p.endswith("/meta.json") for p in stored)
    # the exported checkpoint came back from S3 with the config that trained it
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert meta["config"]["data"]["s3_endpoint"] == endpoint
    assert meta["config"]["train"]["storage_path"] == f"{bucket}/runs"
