import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dcgh_dist.data.demo import demo_split_sizes, generate_demo_dataset
from dcgh_dist.data.format import (
    DatasetError,
    DatasetInfo,
    read_dataset_info,
    scan_dataset,
    write_dataset,
)
from dcgh_dist.data.preprocess import BatchPreprocessor


def _png(color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), color).save(buf, format="PNG")
    return buf.getvalue()


INFO = DatasetInfo(name="t", num_classes=3, class_names=("a", "b", "c"))


def _rows(n=6):
    return [{"id": i, "labels": [i % 3], "split": ["train", "query", "db"][i % 3],
             "image": _png(), "text": f"item {i}"} for i in range(n)]


def test_write_scan_round_trip(tmp_path):
    write_dataset(str(tmp_path), INFO, _rows(7), rows_per_file=3)
    assert read_dataset_info(str(tmp_path)) == INFO
    scan = scan_dataset(str(tmp_path))
    assert len(scan.files) == 3
    assert scan.split_counts == {"train": 3, "query": 2, "db": 2, "val": 0}


def _write_raw(tmp_path, table, info=INFO, name="part-0.parquet"):
    (tmp_path / "dataset.json").write_text(info.to_json())
    pq.write_table(table, tmp_path / name)
    return str(tmp_path / name)


def _table(**cols):
    base = {
        "id": pa.array([10, 11], pa.int64()),
        "labels": pa.array([[0], [1, 2]], pa.list_(pa.int32())),
        "split": pa.array(["train", "db"]),
        "image": pa.array([_png(), _png()], pa.binary()),
        "text": pa.array(["x", "y"]),
    }
    base.update(cols)
    return pa.table({k: v for k, v in base.items() if v is not None})


@pytest.mark.parametrize(
    "cols,match",
    [
        ({"text": None}, r"missing column\(s\) \['text'\]"),
        ({"labels": pa.array([[0], [3]], pa.list_(pa.int32()))}, r"row id 11: column 'labels' has 3, outside 0..2"),
        ({"labels": pa.array([[0], []], pa.list_(pa.int32()))}, r"row id 11: column 'labels' is empty"),
        ({"split": pa.array(["train", "test"])}, r"row id 11: column 'split' is 'test'"),
        # wrong kinds of type: each would train silently on reinterpreted data, or crash in a worker
        ({"labels": pa.array([[0.0], [1.0]], pa.list_(pa.float32()))},
         r"column 'labels' is list<\w+: float>, expected list<int32>"),
        ({"labels": pa.array([["a"], ["b"]], pa.list_(pa.string()))}, r"column 'labels' is list<\w+: string>"),
        ({"text": pa.array([1, 2], pa.int64())}, r"column 'text' is int64, expected string"),
        ({"image": pa.array(["a.jpg", "b.jpg"])}, r"column 'image' is string, expected binary"),
        ({"id": pa.array(["10", "11"])}, r"column 'id' is string, expected int64"),
    ],
)
def test_validation_errors_name_file_row_and_column(tmp_path, cols, match):
    path = _write_raw(tmp_path, _table(**cols))
    with pytest.raises(DatasetError, match=match) as e:
        scan_dataset(str(tmp_path))
    assert path in str(e.value)


def test_ragged_features_are_rejected(tmp_path):
    info = DatasetInfo(name="f", num_classes=3, class_names=("a", "b", "c"),
                       image_column="image_features", text_column="text_features",
                       image_feature_dim=4, text_feature_dim=2)
    t = pa.table({
        "id": pa.array([1, 2], pa.int64()),
        "labels": pa.array([[0], [1]], pa.list_(pa.int32())),
        "split": pa.array(["train", "db"]),
        "image_features": pa.array([[0.0] * 4, [0.0] * 3], pa.list_(pa.float32())),
        "text_features": pa.array([[0.0] * 2, [0.0] * 2], pa.list_(pa.float32())),
    })
    path = _write_raw(tmp_path, t, info)
    with pytest.raises(DatasetError, match=r"row id 2: column 'image_features' has length 3, expected 4") as e:
        scan_dataset(str(tmp_path))
    assert path in str(e.value)


def test_duplicate_ids_across_files(tmp_path):
    _write_raw(tmp_path, _table(), name="a.parquet")
    pq.write_table(_table(), tmp_path / "b.parquet")
    with pytest.raises(DatasetError, match="id 10 appears 2 times"):
        scan_dataset(str(tmp_path))


def test_missing_dataset_json_and_no_files(tmp_path):
    with pytest.raises(DatasetError, match="no dataset.json"):
        scan_dataset(str(tmp_path))
    (tmp_path / "dataset.json").write_text(INFO.to_json())
    with pytest.raises(DatasetError, match="no .parquet files"):
        scan_dataset(str(tmp_path))


def test_label_table_reads_every_file_in_id_order(tmp_path):
    """The one reader of the light columns: ids sorted across files, packed multi-hot labels, the
    first class of each list, splits; an unknown id is an error naming it and the dataset."""
    from dcgh_dist.data.labels import LabelTable

    rows = [{"id": i, "labels": [(i + 1) % 3, i % 3] if i % 2 else [i % 3],
             "split": ["train", "query", "db"][i % 3], "image": _png(), "text": "t"} for i in (9, 4, 7, 0, 5, 2)]
    write_dataset(str(tmp_path), INFO, rows, rows_per_file=2)
    t = LabelTable.read(str(tmp_path))
    assert t.ids.tolist() == [0, 2, 4, 5, 7, 9]
    want = {r["id"]: r for r in rows}
    for pos, i in enumerate(t.ids):
        assert np.flatnonzero(t.multihot(pos)).tolist() == sorted(set(want[i]["labels"]))
        assert t.first[pos] == want[i]["labels"][0]
    assert t.ids[t.in_splits(("query",))].tolist() == [4, 7]
    assert t.positions(np.array([[9, 0]])).tolist() == [[5, 0]]
    with pytest.raises(ValueError, match=r"query id 3 \(and 0 more\) has no row in the labels dataset"):
        t.positions(np.array([2, 3]), "query id")
    bad = pa.table({"id": [1, 2], "labels": [[0], [1]], "split": ["train", "test"]})
    with pytest.raises(DatasetError, match="row id 2 has split 'test'"):
        LabelTable.from_table(bad, 3)


def test_preprocessor_outputs_and_bad_rows():
    pre = BatchPreprocessor(INFO, image_size=32, context_length=16)
    batch = {"id": np.array([1, 2]), "labels": np.array([np.array([0]), np.array([1, 2])], dtype=object),
             "image": np.array([_png(), _png((0, 0, 255))], dtype=object), "text": np.array(["a cat", "a dog"]),
             "path": np.array(["f.parquet", "f.parquet"])}
    out = pre(batch)
    assert out["image"].shape == (2, 3, 32, 32) and out["image"].dtype == np.float32
    assert out["text"].shape == (2, 16) and out["text"][0, 0] == 49406
    np.testing.assert_array_equal(out["labels"], [[1, 0, 0], [0, 1, 1]])

    corrupt = dict(batch, image=np.array([_png(), _png()[:40]], dtype=object))
    with pytest.raises(DatasetError, match=r"f.parquet: row id 2: column 'image' cannot be decoded"):
        pre(corrupt)
    empty = dict(batch, text=np.array(["a cat", "   "]))
    with pytest.raises(DatasetError, match=r"f.parquet: row id 2: column 'text' is empty"):
        pre(empty)
    out_of_range = dict(batch, labels=np.array([np.array([0]), np.array([7])], dtype=object))
    with pytest.raises(DatasetError, match=r"row id 2: column 'labels' has \[7\], outside 0..2"):
        pre(out_of_range)


def test_demo_is_deterministic_multilabel_and_follows_format(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate_demo_dataset(str(a), size=300, seed=3, rows_per_file=200)
    generate_demo_dataset(str(b), size=300, seed=3, rows_per_file=200)
    for f in ("part-00000.parquet", "part-00001.parquet"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    scan = scan_dataset(str(a))
    assert scan.info.num_classes >= 10
    sizes = demo_split_sizes(300)
    assert {k: scan.split_counts[k] for k in sizes} == sizes
    t = pq.read_table(a / "part-00000.parquet")
    assert np.mean([len(x) for x in t.column("labels").to_pylist()]) >= 2.0
    texts = t.column("text").to_pylist()
    assert all(t.strip() for t in texts)
    # captions don't always name every label: the text side alone is not trivially perfect
    names = scan.info.class_names
    omitted = sum(any(names[l] not in txt for l in labs)
                  for txt, labs in zip(texts, t.column("labels").to_pylist()))
    assert omitted > 0.2 * len(texts)


def test_footer_reader_pool_is_sized_to_the_files(monkeypatch):
    """Ray Data's Parquet listing starts a pool of footer-reader actors per read (32 by default);
    the pipeline sizes it to the file count, and Ray's indexer must actually pick the value up."""
    from dcgh_dist.data.pipeline import FOOTER_ENV, footer_reader_actors

    indexer_mod = pytest.importorskip(
        "ray.data._internal.datasource_v2.formats.parquet.footer_file_indexer")
    monkeypatch.delenv(FOOTER_ENV, raising=False)
    for n_files, expected in [(2, 1), (512, 1), (513, 2), (10**6, 32)]:
        with footer_reader_actors(n_files) as n:
            assert n == expected
            indexer = indexer_mod.FooterFileIndexer(ignore_missing_paths=False)
            assert indexer._num_actors == expected  # the knob Ray 2.60 reads when a read is planned
        assert FOOTER_ENV not in os.environ  # restored: nothing leaks to later reads
    monkeypatch.setenv(FOOTER_ENV, "7")  # the user's own setting wins
    with footer_reader_actors(2) as n:
        assert n == 7 and os.environ[FOOTER_ENV] == "7"
