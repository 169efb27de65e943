"""Real data, as a user gets it: the documented COCO commands on 159 real MS-COCO 2017 images.

tests/data/coco-mini is a subset of COCO 2017 in its raw layout (real photographs and the COCO
annotation files, unmodified; tests/data/README.md gives the source and licences). The expected
rows are read from the annotation JSON here, independently of dcgh_dist's COCO reader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import REPO, TEST_DATA

COCO = TEST_DATA / "coco-mini"
SIZES = ["--query", "20", "--val", "20", "--train", "100"]  # 159 items: the rest is the database


def expected_rows() -> dict[int, tuple[tuple[int, ...], str, str]]:
    """id -> (labels, first caption, image path) from the annotation files themselves."""
    out = {}
    for split in ("train2017", "val2017"):
        inst = json.loads((COCO / "annotations" / f"instances_{split}.json").read_text())
        caps = json.loads((COCO / "annotations" / f"captions_{split}.json").read_text())
        cat_index = {c["id"]: i for i, c in enumerate(sorted(inst["categories"], key=lambda c: c["id"]))}
        labels: dict[int, set[int]] = {}
        for a in inst["annotations"]:
            labels.setdefault(a["image_id"], set()).add(cat_index[a["category_id"]])
        first: dict[int, tuple[int, str]] = {}
        for a in caps["annotations"]:
            if a["image_id"] not in first or a["id"] < first[a["image_id"]][0]:
                first[a["image_id"]] = (a["id"], " ".join(a["caption"].split()))
        for im in inst["images"]:
            out[im["id"]] = (tuple(sorted(labels[im["id"]])), first[im["id"]][1], f"{split}/{im['file_name']}")
    return out


def prepare(data_root: Path) -> subprocess.CompletedProcess:
    # docs/PREPARE_DATA.md: `python jobs/prepare_data.py --dataset coco --input /raw/coco2017`
    # writes $DCGH_DATA_ROOT/coco; the split sizes are lowered to fit 159 images
    env = {**os.environ, "DCGH_DATA_ROOT": str(data_root)}
    return subprocess.run([sys.executable, str(REPO / "jobs" / "prepare_data.py"), "--dataset", "coco",
                           "--input", str(COCO), *SIZES], capture_output=True, text=True, env=env, timeout=300)


def test_real_coco_prepares_every_image_with_its_labels_and_first_caption(tmp_path):
    proc = prepare(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "coco"
    info = json.loads((out / "dataset.json").read_text())
    assert info["num_classes"] == 80 and info["class_names"][:3] == ["person", "bicycle", "car"]
    rows = {r["id"]: r for f in sorted(out.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()}
    want = expected_rows()
    assert len(want) == 159 and set(rows) == set(want)  # nothing dropped, nothing invented
    for i, (labels, caption, path) in want.items():
        assert tuple(rows[i]["labels"]) == labels and rows[i]["text"] == caption, i
        assert rows[i]["image"] == (COCO / path).read_bytes(), i  # stored as read (no --max-side)
    splits = [r["split"] for r in rows.values()]
    assert {s: splits.count(s) for s in set(splits)} == {"query": 20, "val": 20, "train": 100, "db": 19}
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["unaccounted"] == 0 and report["source_items"] == 159
    assert "nothing skipped" in proc.stdout + proc.stderr


def test_real_coco_split_sizes_that_do_not_fit_say_so(tmp_path):
    env = {**os.environ, "DCGH_DATA_ROOT": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "prepare_data.py"), "--dataset", "coco",
                           "--input", str(COCO)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "only 159 items pass the checks, fewer than query + val + train = 17500" in proc.stderr
    assert "lower --query/--val/--train" in proc.stderr


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_real_coco_trains_encodes_and_scores_with_the_documented_commands(tmp_path):
    """A smoke run on real photographs: prepare, then `jobs/train.py --dataset coco` with the
    demo's tiny CLIP (a CPU cannot train the preset's model in a test) for two epochs. Quality on
    100 training images is not the point: that every image decodes, every tower runs and the
    job scores all 80 classes on real, multi-label rows."""
    assert prepare(tmp_path).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["DCGH_DATA_ROOT"] = str(tmp_path)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--dataset", "coco",
                           "--output-dir", str(out), "--epochs", "2", "--batch-size", "32",
                           "model.clip_preset=tiny"],
                          capture_output=True, text=True, env=env, timeout=800, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_query"] == 20 and m["num_database"] == 139  # every row but the queries
    assert len(m["history"]) == 2
    for key in ("map_i2t", "map_t2i"):
        assert 0.0 < m[key] <= 1.0, (key, m[key])
