"""Whole ``jobs/train.py`` runs through ``main([...])`` on a real local Ray cluster.

One uninterrupted run (module fixture) is checked for its outputs and against the untrained
baseline; a second run with the same config has a training worker killed mid-run and must resume
from its last checkpoint, finish with the same number of steps, and land near the first run.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psutil
import pytest

from dcgh_dist.train.runner import run_directory

REPO = Path(__file__).resolve().parents[1]

EPOCHS, BATCH = 10, 64
# 90 steps of a tiny CLIP from scratch on 600 training pairs: a larger learning rate than the
# demo preset's, which is tuned for 16 epochs of 2,000 pairs in batches of 32.
COMMON = [
    "--epochs", str(EPOCHS), "--bits", "64", "--batch-size", str(BATCH),
    "model.clip_preset=tiny", "optim.tower_lr=1e-3", "optim.head_lr=3e-3", "optim.weight_decay=0.05",
    "train.log_every=10",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_small, ray_cluster):
    from dcgh_dist.jobs import train as train_job

    out = tmp_path_factory.mktemp("train") / "run"
    result = train_job.main(["--dataset", demo_small, "--output-dir", str(out), *COMMON]).metrics
    return out, result


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_train_job_beats_untrained_baseline(uninterrupted):
    out, result = uninterrupted
    for name in ("config.yaml", "metrics.json", "pr_curve.png", "loss_curve.png",
                 "checkpoint/model.pt", "checkpoint/proxies.pt", "checkpoint/meta.json"):
        assert (out / name).exists(), name
    # real pictures: the PR plot has a trained and an untrained curve per direction, the loss
    # plot one line per loss term and the val mAP
    from plots import line_pixels, read_plot

    assert len(line_pixels(read_plot(out / "pr_curve.png"))) >= 2
    assert len(line_pixels(read_plot(out / "loss_curve.png"))) >= 3
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
    assert meta["config"]["model"]["bits"] == 64 and meta["config"]["data"]["batch_size"] == BATCH
    assert len(metrics["history"]) == EPOCHS and all("val_map" in h for h in metrics["history"])
    best = max(range(EPOCHS), key=lambda i: metrics["history"][i]["val_map"]) + 1
    assert metrics["selected_epoch"] == best
    # the export holds what consumers need, not the optimizer state
    assert not (out / "checkpoint" / "train_state.pt").exists()


def _train_workers() -> list[psutil.Process]:
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_killed_worker_resumes_from_last_checkpoint(tmp_path, demo_small, uninterrupted):
    from dcgh_dist.jobs import train as train_job

    _, clean = uninterrupted
    out = tmp_path / "run"
    box: dict = {}

    def run():
        try:
            box["result"] = train_job.main([
                "--dataset", demo_small, "--output-dir", str(out), "--skip-baseline", *COMMON,
                "train.max_failures=1", "train.checkpoint_every_steps=4",
            ]).metrics
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    # Kill only once Ray Train's controller has registered a checkpoint (it lists it in its
    # snapshot): files of a checkpoint whose report the controller had not yet collected may
    # appear on disk first, and a restart rightly ignores those.
    deadline = time.time() + 600
    run_dir = None  # known once the job has written run.json
    registered: list = []
    while not registered:
        assert thread.is_alive(), box.get("error")
        assert time.time() < deadline, "no checkpoint was registered"
        time.sleep(0.5)
        if run_dir is None:
            where = run_directory(str(out)) if (out / "run.json").exists() else None
            if where is None:
                continue
            run_dir = Path(where)
        try:
            snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        except (OSError, ValueError):  # not written yet, or being rewritten
            continue
        registered = [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]
    metas = [json.loads((run_dir / name / "meta.json").read_text()) for name in registered]
    first_meta = max(metas, key=lambda m: m["global_step"])  # what a restart must start from
    victims = _train_workers()
    assert victims, "no RayTrainWorker process found to kill"
    for v in victims:
        v.kill()  # SIGKILL: no cleanup, as when a node disappears
    thread.join(timeout=800)
    assert not thread.is_alive()
    if "error" in box:
        raise box["error"]
    result = box["result"]

    steps_per_epoch = 600 // BATCH
    last = result["history"][-1]
    assert last["global_step"] == EPOCHS * steps_per_epoch  # no step lost or repeated
    assert [h["epoch"] for h in result["history"]] == list(range(1, EPOCHS + 1))
    assert first_meta["global_step"] < EPOCHS * steps_per_epoch  # the kill came mid-run
    # ...and the restart continued from a checkpoint written before the kill, not from scratch:
    # the epochs that checkpoint had finished are kept as they were, not redone.
    resumes = [h["resumed_from_step"] for h in result["history"] if "resumed_from_step" in h]
    assert len(resumes) == 1 and resumes[0] >= first_meta["global_step"] > 0, resumes
    done = len(first_meta["history"])
    assert result["history"][:done] == first_meta["history"]
    # quality in line with the uninterrupted run (same config, different data order after resume)
    for key in ("map_i2t", "map_t2i"):
        assert abs(result[key] - clean[key]) < 0.1, (key, result[key], clean[key])
        assert result[key] > clean["untrained"][key] + 0.05
