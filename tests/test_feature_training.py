"""Feature datasets train well by default: the towers follow dataset.json, training stops when val
stops improving, small splits are read once into the object store, and every evaluation of a
feature dataset scores the linear hashing baseline beside the trained model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dcgh_dist.config import Config, ModelConfig, load_config
from dcgh_dist.data.format import DatasetInfo, write_dataset

REPO = Path(__file__).resolve().parents[1]


def _feature_dataset(path: Path, n: int = 400, dim_i: int = 12, dim_t: int = 6, classes: int = 4,
                     noise: float = 0.3, seed: int = 0) -> str:
    """Single-label features that are a linear function of the label plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    mi, mt = rng.standard_normal((classes, dim_i)), rng.standard_normal((classes, dim_t))
    splits = np.array(["query"] * (n // 5) + ["val"] * (n // 10) + ["train"] * (n - n // 5 - n // 10))
    rng.shuffle(splits)
    rows = [{"id": i, "labels": [int(labels[i])], "split": str(splits[i]),
             "image_features": (mi[labels[i]] + noise * rng.standard_normal(dim_i)).tolist(),
             "text_features": (mt[labels[i]] + noise * rng.standard_normal(dim_t)).tolist()} for i in range(n)]
    info = DatasetInfo("feats", classes, tuple(f"c{c}" for c in range(classes)), "image_features",
                       "text_features", dim_i, dim_t)
    write_dataset(str(path), info, rows)
    return str(path)


# -- the towers follow the dataset ------------------------------------------------------------


def test_family_follows_dataset_json(tmp_path, demo_small):
    from dcgh_dist.train.runner import plan_run

    feats = _feature_dataset(tmp_path / "feats")
    cfg = load_config(overrides=[f"data.dataset={feats}", f"train.output_dir={tmp_path / 'a'}"])
    assert cfg.model.family == "auto"
    assert plan_run(cfg).cfg.model.family == "features"
    cfg = load_config(overrides=[f"data.dataset={demo_small}", f"train.output_dir={tmp_path / 'b'}"])
    assert plan_run(cfg).cfg.model.family == "clip"
    # set explicitly, a family that cannot read the columns is an error that says what to set
    cfg = load_config(overrides=[f"data.dataset={feats}", "model.family=clip", f"train.output_dir={tmp_path / 'c'}"])
    with pytest.raises(ValueError, match=r"model.family=clip does not fit .*needs model.family=features"):
        plan_run(cfg)
    cfg = load_config(overrides=[f"data.dataset={demo_small}", "model.family=features",
                                 f"train.output_dir={tmp_path / 'd'}"])
    with pytest.raises(ValueError, match=r"needs model.family=clip"):
        plan_run(cfg)


def test_mismatched_family_stops_the_job_before_ray(tmp_path):
    feats = _feature_dataset(tmp_path / "feats")
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--dataset", feats,
                           "--output-dir", str(tmp_path / "out"), "model.family=clip"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "model.family=features" in lines[0], proc.stderr[-2000:]
    assert "ray" not in proc.stderr.lower().replace("array", "")  # nothing of Ray was started


def test_checkpoints_record_the_resolved_family():
    from dcgh_dist.models.checkpoint import CheckpointMeta

    info = DatasetInfo("f", 2, ("a", "b"), "image_features", "text_features", 3, 4)
    meta = CheckpointMeta(Config(), info)
    assert meta.config.model.family == "features"
    assert json.loads(meta.to_json())["config"]["model"]["family"] == "features"
    assert CheckpointMeta(Config(), DatasetInfo("i", 2, ("a", "b"))).config.model.family == "clip"


def test_mixed_columns_have_no_family():
    from dcgh_dist.models import resolve_family

    info = DatasetInfo("m", 2, ("a", "b"), "image_features", "text", 3, None)
    with pytest.raises(ValueError, match="either both raw modalities"):
        resolve_family(ModelConfig(), info)


# -- early stopping ---------------------------------------------------------------------------


def test_patience_counts_evaluations_since_the_best():
    from dcgh_dist.train.loop import best_val_epoch, patience_exhausted

    hist = [{"epoch": e, "val_map": v} for e, v in enumerate([0.1, 0.3, 0.2, 0.3, 0.25], start=1)]
    assert best_val_epoch(hist) == 2  # a tie (epoch 4) is no improvement
    assert not patience_exhausted(hist[:4], 3)
    assert patience_exhausted(hist, 3)
    assert not patience_exhausted(hist, 0)  # 0 = never stop early
    assert not patience_exhausted([{"epoch": 1}], 1)  # no val: nothing to watch
    nan_first = [{"epoch": 1, "val_map": float("nan")}, {"epoch": 2, "val_map": 0.1}]
    assert best_val_epoch(nan_first) == 2


# -- the cached training split ----------------------------------------------------------------


def _rows(n: int) -> dict[str, np.ndarray]:
    return {"id": np.arange(n), "labels": np.eye(3, dtype=np.float32)[np.arange(n) % 3],
            "image_features": np.arange(n, dtype=np.float32)[:, None].repeat(2, 1)}


@pytest.mark.parametrize("world", [2, 3])
def test_cached_batches_of_n_workers_are_the_global_batches_of_one(world):
    from dcgh_dist.train.loop import epoch_batches

    n, b = 53, 4
    rows = _rows(n)
    steps = (n // world) // b

    def ids(w, bs, first=0, epoch=0):
        out = []
        for r in range(w):
            out.append([bt["id"].tolist() for bt in epoch_batches(rows, seed=7, epoch=epoch, rank=r, world=w,
                                                                   batch_size=bs, steps=steps, first=first)])
        return out

    per_rank = ids(world, b)
    single = ids(1, world * b)[0][:steps]
    for t in range(steps):  # step t of every worker, in rank order = step t of one process
        assert sum((per_rank[r][t] for r in range(world)), []) == single[t]
    seen = sum((sum(r, []) for r in per_rank), [])
    assert len(seen) == len(set(seen)) == steps * world * b  # no row twice in an epoch
    assert ids(world, b, epoch=1) != per_rank  # a fresh order every epoch
    assert ids(world, b, first=2) == [r[2:] for r in per_rank]  # a resumed epoch continues exactly
    first = next(epoch_batches(rows, seed=7, epoch=0, rank=0, world=1, batch_size=b, steps=1))
    assert first["image_features"].dtype.is_floating_point and tuple(first["labels"].shape) == (b, 3)


def test_cache_decision_caches_small_deterministic_splits():
    from dcgh_dist.train.runner import cache_decision, preprocessed_row_bytes

    feats = DatasetInfo("f", 10, tuple("abcdefghij"), "image_features", "text_features", 128, 10)
    images = DatasetInfo("i", 10, tuple("abcdefghij"))
    cfg = Config()
    assert preprocessed_row_bytes(cfg, feats) == 8 + 40 + 512 + 40
    ok, why = cache_decision(cfg, feats, 100_000)
    assert ok and why.startswith("cached")
    ok, why = cache_decision(load_config(overrides=["data.cache_bytes=1000000"]), feats, 100_000)
    assert not ok and "data.cache_bytes" in why
    ok, why = cache_decision(load_config(overrides=["data.cache_bytes=0"]), feats, 10)
    assert not ok
    ok, why = cache_decision(cfg, images, 10)  # augmented crops differ every epoch: stream
    assert not ok and "augment" in why
    assert cache_decision(load_config(overrides=["data.augment=false"]), images, 10)[0]


# -- the linear hashing baseline --------------------------------------------------------------


def test_linear_baseline_formula_and_scores(tmp_path):
    from dcgh_dist.baselines import fit_ridge, linear_baseline, random_rotation, read_feature_rows
    from dcgh_dist.data.format import read_dataset_info

    for c, k in ((4, 16), (20, 16)):
        r = random_rotation(c, k, seed=3)
        assert r.shape == (c, k)
        gram = r @ r.T if c <= k else r.T @ r
        np.testing.assert_allclose(gram, np.eye(min(c, k)), atol=1e-12)
        np.testing.assert_array_equal(r, random_rotation(c, k, seed=3))  # seeded
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((50, 5)), rng.standard_normal((50, 3))
    mu, w = fit_ridge(x, y, 0.0)  # no ridge: ordinary least squares on centred data
    np.testing.assert_allclose(w, np.linalg.lstsq(x - x.mean(0), y - y.mean(0), rcond=None)[0], atol=1e-10)

    clean = _feature_dataset(tmp_path / "clean", noise=0.05)
    info = read_dataset_info(clean)
    cfg = load_config(overrides=["model.bits=16"])
    m, curves = linear_baseline(clean, info, cfg)
    assert m["map_i2t"] > 0.95 and m["map_t2i"] > 0.95  # linearly separable: near perfect
    assert set(curves) == {"i2t", "t2i"} and m["ridge_chosen_on"] == "val"
    noisy = _feature_dataset(tmp_path / "noisy", noise=3.0)
    m2, _ = linear_baseline(noisy, read_dataset_info(noisy), cfg)
    assert m2["map_i2t"] < m["map_i2t"] - 0.2  # ...and it is not a constant
    rows = read_feature_rows(clean, info, None)
    assert rows["image_features"].shape == (400, 12) and np.all(np.diff(rows["id"]) > 0)
    assert (rows["labels"].sum(1) == 1).all()


# -- the whole job on a feature dataset -------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_feature_dataset_plain_command(tmp_path, demo_features, ray_cluster):
    """`jobs/train.py --dataset FEATURES` with no family set: feature towers, two workers on the
    cached split, early stopping, and the linear baseline in metrics.json, table and plot."""
    from dcgh_dist.jobs import train as train_job

    from plots import line_pixels, read_plot

    out = tmp_path / "run"
    epochs, patience = 40, 3
    result = train_job.main(["--dataset", demo_features, "--output-dir", str(out), "--num-workers", "2",
                             "--epochs", str(epochs), f"train.patience={patience}", "--batch-size", "64"]).metrics
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert meta["config"]["model"]["family"] == "features"
    assert result["train_data"].startswith("cached")
    hist = result["history"]
    # stopped early, exactly `patience` evaluations after the best one, which is the export
    assert result["stopped_early"] and hist[-1]["stopped_early"] and len(hist) < epochs
    assert hist[-1]["epoch"] - result["best_val_epoch"] == patience
    assert result["selected_epoch"] == result["best_val_epoch"] == meta["epoch"]
    best = max(h["val_map"] for h in hist)
    assert hist[result["best_val_epoch"] - 1]["val_map"] == best
    # both workers ran every step of every epoch on the cached split
    assert hist[-1]["global_step"] == len(hist) * ((1956 // 2) // 64)
    # two workers share the node's cores (4 logical CPUs here, capped at the real ones), not one
    # thread each because Ray set OMP_NUM_THREADS to their CPU request
    assert {h["torch_threads"] for h in hist} == {max(1, min(4, len(os.sched_getaffinity(0))) // 2)}
    lin = result["linear"]
    assert {"map_i2t", "map_t2i", "ndcg@1000_i2t", "p@10_t2i"} <= set(lin)
    assert json.loads((out / "metrics.json").read_text())["linear"] == lin
    for key in ("map_i2t", "map_t2i"):
        assert result[key] > result["untrained"][key] + 0.1, key
        assert lin[key] > result["untrained"][key] + 0.05, key  # the baseline is a real method
    # the PR plot: trained, untrained and linear per direction; the loss plot marks the stop
    assert len(line_pixels(read_plot(out / "pr_curve.png"))) >= 3
    colours = line_pixels(read_plot(out / "loss_curve.png"))
    # loss terms in several colours (red and orange may share a hue bin), and the two vertical
    # markers: the best epoch (green) and the stop (red), each a column spanning most of the axes
    assert len(colours) >= 3

    height = read_plot(out / "loss_curve.png").shape[0]

    def column_cover(px):  # largest share of the image's rows one pixel column of this colour fills
        cols = np.round(px[:, 0] * 1000).astype(int)
        return max(len(np.unique(np.round(px[cols == c, 1] * height))) / height for c in np.unique(cols))

    assert sum(column_cover(px) > 0.15 for px in colours) >= 2  # curves cover ~0.03, markers ~0.25


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_the_same_command_gives_the_same_model_and_the_seed_changes_it(tmp_path, demo_features):
    """`jobs/train.py --dataset FEATURES` twice, as separate commands (each its own Ray, workers
    and threads): the same losses, val mAP and test metrics to 1e-6; train.seed changes them.
    Ray Data yields rows in the order its tasks finish, so the cached split's row order (and with
    it every epoch's seeded batches) used to differ between runs."""
    def run(name: str, *extra: str) -> dict:
        out = tmp_path / name
        cmd = [sys.executable, str(REPO / "jobs" / "train.py"), "--dataset", demo_features, "--epochs", "4",
               "--output-dir", str(out), "--skip-baseline", *extra]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((out / "metrics.json").read_text())

    def numbers(m: dict) -> dict[str, float]:
        out = {k: float(v) for k, v in m.items() if k.startswith(("map_", "ndcg@", "p@"))}
        for h in m["history"]:
            out.update({f"epoch{h['epoch']}.{k}": float(v) for k, v in h.items()
                        if k.startswith(("loss_", "val_map"))})
        return out

    a, b, other = run("a"), run("b"), run("seed1", "train.seed=1")
    # one worker on its own cluster: every core (the documented default, not Ray's one thread)
    assert {h["torch_threads"] for h in a["history"]} == {len(os.sched_getaffinity(0))}
    na, nb = numbers(a), numbers(b)
    assert na.keys() == nb.keys() and len(na) > 20
    assert {k: v for k, v in na.items() if abs(v - nb[k]) > 1e-6} == {}
    assert a["selected_epoch"] == b["selected_epoch"]
    no = numbers(other)
    assert any(abs(na[k] - no[k]) > 1e-4 for k in na if k in no)


def test_torch_threads_set_by_hand_are_used_and_checked():
    from dcgh_dist.train.loop import worker_threads

    assert worker_threads(3, workers_on_node=2) == 3  # no Ray needed: the setting is taken as is
    with pytest.raises(ValueError, match="train.torch_threads must be >= 1"):
        worker_threads(0, workers_on_node=1)
