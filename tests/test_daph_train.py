"""DAPH through the one training path: both stages of `jobs/train.py --method daph`, the proxy-code
artifact (versioned, no pickle, tied to its dataset), and the stage-2 checkpoint through
encode -> build_index -> search like any other."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dcgh_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _codes(n=20, k=16, c=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.eye(c)[rng.integers(0, c, n)]
    return {"id": np.arange(n), "image_codes": rng.standard_normal((n, k)), "text_codes": rng.standard_normal((n, k)),
            "labels": labels, "class_codes": rng.standard_normal((c, k))}


def test_proxy_codes_round_trip_and_refusals(tmp_path):
    from dcgh_dist.train.proxy_codes import read_proxy_codes, write_proxy_codes

    cfg = load_config(overrides=["model.bits=16", "train.method=daph"])
    path = str(tmp_path / "codes.npz")
    codes = _codes()
    write_proxy_codes(path, codes, cfg, "abc123")
    with np.load(path, allow_pickle=False) as z:  # plain arrays only: loads without pickle
        assert all(z[k].dtype != object for k in z.files)
    got = read_proxy_codes(path, cfg, "abc123", 4)
    np.testing.assert_array_equal(got["image_codes"], np.where(codes["image_codes"] >= 0, 1, -1))
    assert got["image_codes"].dtype == np.int8 and set(np.unique(got["class_codes"])) <= {-1, 1}
    meta = got["meta"]
    assert meta["dataset_fingerprint"] == "abc123" and meta["config"]["model"]["bits"] == 16
    assert meta["format"].startswith("dcgh-dist/daph-proxy-codes/")
    with pytest.raises(ValueError, match="another dataset"):
        read_proxy_codes(path, cfg, "other", 4)
    with pytest.raises(ValueError, match="model.bits=32"):
        read_proxy_codes(path, load_config(overrides=["model.bits=32"]), "abc123", 4)
    with pytest.raises(FileNotFoundError, match="run stage 1 first"):
        read_proxy_codes(str(tmp_path / "none.npz"), cfg, "abc123", 4)
    pickled = tmp_path / "pickled.npz"
    buf = io.BytesIO()
    np.savez(buf, meta=np.array([{"format": "x"}], dtype=object))  # would need pickle to load
    pickled.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="not a DAPH proxy-code file"):
        read_proxy_codes(str(pickled), cfg, "abc123", 4)


def test_dataset_fingerprint_follows_rows_not_paths(tmp_path, demo_features):
    import pyarrow.parquet as pq

    from dcgh_dist.data.format import scan_dataset

    a = scan_dataset(demo_features).fingerprint
    copy = tmp_path / "copy"
    shutil.copytree(demo_features, copy)
    assert scan_dataset(str(copy)).fingerprint == a  # moved: the same rows
    f = sorted(copy.glob("*.parquet"))[0]
    t = pq.read_table(f)
    labels = t.column("labels").to_pylist()
    labels[0] = [(labels[0][0] + 1) % 10]
    pq.write_table(t.set_column(t.schema.get_field_index("labels"), "labels",
                                __import__("pyarrow").array(labels, type=t.schema.field("labels").type)), f)
    assert scan_dataset(str(copy)).fingerprint != a  # one label changed: another dataset


def test_proxy_code_statistics_on_ideal_codes():
    from dcgh_dist.train.daph import proxy_code_stats

    k, c = 16, 4
    cls = np.sign(np.random.default_rng(1).standard_normal((c, k)))
    labels = np.eye(c)[np.arange(40) % c]
    codes = {"image_codes": labels @ cls, "text_codes": labels @ cls, "class_codes": cls, "labels": labels}
    s = proxy_code_stats(codes, queries=40)
    assert s["image_to_own_class"] == 0 and s["image_nearest_class_is_own"] == 1.0
    assert s["proxy_map_i2t"] == pytest.approx(1.0) and s["image_text_bit_agreement"] == 1.0
    assert s["image_identical_labels_distance"] == 0 and s["image_distinct_codes"] == c


def test_stage1_checkpoints_cannot_encode(tmp_path):
    from dcgh_dist.data.format import DatasetInfo
    from dcgh_dist.models.checkpoint import CheckpointError, CheckpointMeta, build_model_for

    info = DatasetInfo("f", 2, ("a", "b"), "image_features", "text_features", 3, 4)
    meta = CheckpointMeta(load_config(overrides=["train.method=daph", "daph.stage=1"]), info)
    with pytest.raises(CheckpointError, match="stage-1"):
        build_model_for(meta)


def test_stage2_without_proxy_codes_stops_before_ray(tmp_path, demo_features):
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--dataset", demo_features,
                           "--method", "daph", "--stage", "2", "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "run stage 1 first" in lines[0], proc.stderr[-2000:]


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_daph_both_stages_then_encode_index_search(tmp_path, demo_features, ray_cluster):
    from dcgh_dist.jobs import evaluate as evaluate_job
    from dcgh_dist.jobs import train as train_job

    from dcgh_dist.data.format import scan_dataset
    from dcgh_dist.index import ShardedIndex
    from dcgh_dist.models.encoder import Encoder
    from dcgh_dist.train.proxy_codes import read_proxy_codes

    out = tmp_path / "run"
    common = ["--dataset", demo_features, "--output-dir", str(out), "--method", "daph", "--num-workers", "2",
              "--batch-size", "64", "--epochs", "6", "--bits", "32", "train.patience=3", "daph.proxy_epochs=3"]
    result = train_job.main(common).metrics
    assert result["method"] == "daph"
    # stage 1: its own run and checkpoint; proxy codes for every training row, tied to the dataset
    stage1 = out / "stage1"
    assert (stage1 / "checkpoint" / "meta.json").exists() and (stage1 / "proxy_code_stats.json").exists()
    s1_meta = json.loads((stage1 / "checkpoint" / "meta.json").read_text())
    assert s1_meta["config"]["daph"]["stage"] == "1" and s1_meta["epoch"] == 3
    scan = scan_dataset(demo_features)
    cfg = load_config(overrides=["model.bits=32"])
    codes = read_proxy_codes(result["proxy_codes"], cfg, scan.fingerprint, scan.info.num_classes)
    assert len(codes["id"]) == scan.split_counts["train"] == 1956
    stats = result["daph_stage1"]
    assert stats["image_to_own_class"] < stats["image_to_other_classes"]  # the codes learnt classes
    # stage 2: an ordinary hasher checkpoint, trained, evaluated with both baselines
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert meta["config"]["train"]["method"] == "daph" and meta["config"]["model"]["family"] == "features"
    for key in ("map_i2t", "map_t2i"):
        assert result[key] > result["untrained"][key] + 0.05, key
    assert result["linear"] and result["history"][-1]["global_step"] > 0
    assert set(result["history"][0]) >= {"loss_total", "loss_image_net", "loss_text_net", "val_map"}
    enc = Encoder.from_checkpoint(str(out / "checkpoint"))
    assert enc.bits == 32
    # encode -> build_index -> search, through the jobs, unchanged
    work = tmp_path / "eval"
    res = evaluate_job.main(["--checkpoint", str(out / "checkpoint"), "--dataset", demo_features,
                             "--work-dir", str(work), "--map-k", "100"])
    assert res["map@100_i2t"] > 0.2 and res["map@100_t2i"] > 0.2, res
    manifests = sorted(work.rglob("manifest.json"))
    assert manifests
    index = ShardedIndex.open(str(manifests[0].parent))
    try:
        fp = json.loads(manifests[0].read_text())["model_fingerprint"]
        assert fp == meta["fingerprint"]
    finally:
        index.close()

    # --resume of both stages reuses the finished stage 1 and continues stage 2's run
    again = train_job.main([*common, "--resume", "--epochs", "7", "--skip-baseline"]).metrics
    assert again["daph_stage1"] is None  # stage 1 was not redone
    assert again["history"][:len(result["history"])] == result["history"]
