"""The parts of dataset preparation on their own: splits, skip report, shard writer, output
ownership, line reader, data paths, image checks."""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dcgh_dist.data.format import DatasetInfo, scan_dataset
from dcgh_dist.storage import write_text_atomic
from dcgh_dist.data.prepare import source
from dcgh_dist.data.prepare.images import ImageOptions, check_image
from dcgh_dist.data.prepare.output import STATE_FILE, TOOL, Run, inspect_output, temp_name
from dcgh_dist.data.prepare.report import SkipReport
from dcgh_dist.data.prepare.splits import SplitAssigner, SplitSizes, assign_splits, seeded_order
from dcgh_dist.data.prepare.writer import ShardWriter, manifest_dict, verify_manifest


def jpeg(size=(40, 30), color=(200, 30, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


# -- splits -----------------------------------------------------------------------------------


def test_split_sizes_are_exact_and_independent_of_input_order():
    ids = list(range(1000, 1100))
    sizes = SplitSizes(query=10, val=5, train=40)
    a = assign_splits(ids, sizes, seed=3)
    b = assign_splits(list(reversed(ids)), sizes, seed=3)
    assert a == b
    counts = {s: sum(v == s for v in a.values()) for s in ("query", "val", "train", "db")}
    assert counts == {"query": 10, "val": 5, "train": 40, "db": 45}
    assert assign_splits(ids, sizes, seed=4) != a


def test_removing_an_item_does_not_reshuffle_the_others():
    ids = list(range(200))
    full = seeded_order(ids, 0, key=lambda x: x)
    without = seeded_order([i for i in ids if i != full[5]], 0, key=lambda x: x)
    assert without == [i for i in full if i != full[5]]


def test_split_assigner_fills_query_val_train_then_db_and_reports_shortfall():
    a = SplitAssigner(SplitSizes(query=2, val=1, train=2))
    assert [a.next() for _ in range(7)] == ["query", "query", "val", "train", "train", "db", "db"]
    short = SplitAssigner(SplitSizes(query=2, val=1, train=2))
    short.next(), short.next(), short.next()
    assert short.shortfall() == {"train": 2}
    with pytest.raises(ValueError, match="--train must be >= 0"):
        SplitSizes(query=1, train=-1)


# -- report -----------------------------------------------------------------------------------


def test_report_keeps_the_smallest_ids_whatever_the_arrival_order():
    r1, r2 = SkipReport(examples_per_reason=3), SkipReport(examples_per_reason=3)
    ids = [50, 7, 99, 3, 12, 8]
    for i in ids:
        r1.add("image_missing", i, f"im{i}.jpg", "gone")
    for i in sorted(ids, reverse=True):
        r2.add("image_missing", i, f"im{i}.jpg", "gone")
    r1.add("no_label", 5, "im5.jpg")
    assert r1.first_ids("image_missing") == r2.first_ids("image_missing") == [3, 7, 8]
    d = r1.to_dict()
    assert list(d) == ["no_label", "image_missing"]  # protocol before error
    assert d["image_missing"] == {"kind": "error", "description": "image file not found", "count": 6,
                                  "first": [{"id": i, "source": f"im{i}.jpg", "detail": "gone"} for i in (3, 7, 8)]}
    assert r1.total("error") == 6 and r1.total("protocol") == 1 and r1.total() == 7
    with pytest.raises(KeyError, match="unknown skip reason"):
        r1.add("oops", 1, "x")


# -- writer -----------------------------------------------------------------------------------

INFO = DatasetInfo(name="w", num_classes=3, class_names=("a", "b", "c"))


def _write(tmp_path, name: str, n: int, shard_bytes: int, row_group_bytes: int | None = None):
    import pyarrow.fs as pafs

    root = str(tmp_path / name)
    pafs.LocalFileSystem().create_dir(root)
    w = ShardWriter(pafs.LocalFileSystem(), root, INFO, shard_bytes=shard_bytes, row_group_bytes=row_group_bytes)
    for i in range(n):
        w.add(i, [i % 3], "train" if i % 2 else "db", bytes([i % 256]) * 968, "t")  # 968 + 1 + 32 = 1001 bytes
    shards = w.close()
    write_text_atomic(pafs.LocalFileSystem(), f"{root}/dataset.json",
                      DatasetInfo(**{**INFO.__dict__, "extra": {"manifest": manifest_dict(shards)}}).to_json())
    return root, shards


def test_shard_boundaries_follow_bytes_and_the_manifest_matches_the_files(tmp_path):
    root, shards = _write(tmp_path, "a", n=10, shard_bytes=3500, row_group_bytes=2000)
    assert [s.rows for s in shards] == [3, 3, 3, 1]  # 3 rows of 1001 bytes fit in 3500, a 4th does not
    assert [s.splits for s in shards][0] == {"db": 2, "train": 1}
    assert (shards[1].id_min, shards[1].id_max) == (3, 5)
    for s in shards:
        data = (tmp_path / "a" / s.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s.sha256 and len(data) == s.bytes
    md = pq.ParquetFile(f"{root}/part-00000.parquet").metadata
    assert md.num_row_groups == 2  # row groups of ~2000 bytes: 2 rows, then 1
    assert md.row_group(0).column(3).compression == "UNCOMPRESSED"  # image bytes: not recompressed
    assert md.row_group(0).column(0).compression == "ZSTD"
    assert scan_dataset(root).split_counts == {"train": 5, "val": 0, "query": 0, "db": 5}
    assert verify_manifest(root) == []
    # Same rows, same bytes.
    _, again = _write(tmp_path, "b", n=10, shard_bytes=3500, row_group_bytes=2000)
    assert [s.sha256 for s in again] == [s.sha256 for s in shards]


def test_verify_manifest_finds_a_changed_and_an_unlisted_shard(tmp_path):
    root, shards = _write(tmp_path, "a", n=4, shard_bytes=2500)
    p = tmp_path / "a" / shards[0].path
    data = bytearray(p.read_bytes())
    data[10] ^= 0xFF
    p.write_bytes(bytes(data))
    (tmp_path / "a" / "extra.parquet").write_bytes((tmp_path / "a" / shards[1].path).read_bytes())
    problems = verify_manifest(root)
    assert any("part-00000.parquet: sha256" in x for x in problems)
    assert any("extra.parquet: Parquet file not in the manifest" in x for x in problems)
    # A manifest path that leaves the dataset is reported, not read.
    info = json.loads((tmp_path / "a" / "dataset.json").read_text())
    info["extra"]["manifest"]["shards"][0]["path"] = "../outside.parquet"
    (tmp_path / "a" / "dataset.json").write_text(json.dumps(info))
    (tmp_path / "outside.parquet").write_bytes(b"not to be read")
    assert any("manifest path '../outside.parquet' is not a file under the dataset root" in x for x in verify_manifest(root))


def test_writer_moves_a_shard_to_its_name_only_once_complete_and_recorded(tmp_path):
    import pyarrow.fs as pafs

    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    seen = []

    def before_publish(entry):
        # Recorded first: the final name does not exist yet, the complete temporary file does.
        assert not (tmp_path / entry.path).exists()
        tmp = tmp_path / temp_name(entry.path, "0123456789abcdef")
        assert tmp.stat().st_size == entry.bytes
        seen.append(entry.path)

    w = ShardWriter(fs, root, INFO, shard_bytes=2500, run_id="0123456789abcdef", before_publish=before_publish)
    for i in range(5):
        w.add(i, [0], "train", bytes(968), "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".part-00002.parquet.tmp-0123456789abcdef",
                                                          "part-00000.parquet", "part-00001.parquet"]
    shards = w.close()
    assert seen == [s.path for s in shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    w2 = ShardWriter(fs, str(tmp_path / "b"), INFO, shard_bytes=2500)
    fs.create_dir(str(tmp_path / "b"))
    w2.add(0, [0], "train", bytes(968), "t")
    w2.abort()  # a failed job: the unfinished shard is gone, nothing is left under a final name
    assert list((tmp_path / "b").iterdir()) == []


def _record(root, run_id, files):
    (root / STATE_FILE).write_text(json.dumps({"tool": TOOL, "run_id": run_id, "files": files}))


def test_inspect_output_claims_only_files_its_records_list(tmp_path):
    import pyarrow.fs as pafs

    fs = pafs.LocalFileSystem()
    rid, other = "a" * 16, "b" * 16
    (tmp_path / "part-00000.parquet").write_bytes(b"x" * 10)
    (tmp_path / "part-00001.parquet").write_bytes(b"x" * 11)  # the record says 12: changed since
    (tmp_path / "part-00002.parquet").write_bytes(b"x")  # in no record
    (tmp_path / temp_name("part-00003.parquet", rid)).write_bytes(b"PAR")  # the recorded run's
    (tmp_path / temp_name("part-00003.parquet", other)).write_bytes(b"PAR")  # a run with no record here
    (tmp_path / temp_name(STATE_FILE, rid)).write_bytes(b'{"tool": "jobs/prep')  # its record, cut short
    (tmp_path / "prepare_report.json").write_text("not json")
    _record(tmp_path, rid, {"part-00000.parquet": 10, "part-00001.parquet": 12})
    c = inspect_output(fs, str(tmp_path), "OUT")
    assert c.interrupted == [rid] and c.complete is None
    assert sorted(c.own) == sorted([STATE_FILE, "part-00000.parquet", temp_name("part-00003.parquet", rid),
                                    temp_name(STATE_FILE, rid)])
    assert sorted(c.foreign) == sorted(["part-00001.parquet", "part-00002.parquet",
                                        temp_name("part-00003.parquet", other), "prepare_report.json"])
    assert "says 12: changed since" in c.foreign["part-00001.parquet"]
    with pytest.raises(ValueError, match="holds 4 file"):
        c.check(overwrite=True)
    # A record is read, never followed: a path that leaves the output makes it no record at all.
    _record(tmp_path, rid, {"../outside.parquet": 1})
    assert STATE_FILE in inspect_output(fs, str(tmp_path), "OUT").foreign


def test_an_overwrite_stopped_while_deleting_leaves_everything_recorded(tmp_path):
    import pyarrow.fs as pafs

    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    for i in range(3):
        (tmp_path / f"part-0000{i}.parquet").write_bytes(b"x" * (i + 1))
    (tmp_path / "dataset.json").write_text(json.dumps({"extra": {
        "manifest": {"shards": [{"path": f"part-0000{i}.parquet", "bytes": i + 1} for i in range(3)]},
        "prepare": {"tool": TOOL, "input": "/raw"}}}))
    with pytest.raises(ValueError, match="complete prepared dataset"):
        Run(fs, root, "OUT").start(overwrite=False)

    class Stopped(BaseException):
        pass

    first = Run(fs, root, "OUT")
    deleted = []

    def delete_two(rel):  # stopped (a SIGKILL) after two deletions
        if len(deleted) == 2:
            raise Stopped
        deleted.append(rel)
        fs.delete_file(f"{root}/{rel}")

    first._delete = delete_two
    with pytest.raises(Stopped):
        first.start(overwrite=True)
    assert deleted == ["dataset.json", "part-00000.parquet"]  # dataset.json first
    c = inspect_output(fs, root, "OUT")
    assert c.complete is None and c.interrupted == [first.id] and not c.foreign
    # The next run, without --overwrite, finds its own record and deletes the rest.
    second = Run(fs, root, "OUT")
    second.start(overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]
    second.abort()
    assert list(tmp_path.iterdir()) == []


# -- line reader --------------------------------------------------------------------------------


def test_iter_lines_handles_crlf_bom_blocks_and_no_final_newline(tmp_path, monkeypatch):
    monkeypatch.setattr(source, "_BLOCK", 5)  # lines straddle block boundaries
    text = "\ufeffstraße\r\nzwei\r\n\r\n東京 tags\u2028inside\nlast".encode("utf-8")
    (tmp_path / "f.txt").write_bytes(text)
    tree = source.InputTree(str(tmp_path))
    lines = tree.read_lines("f.txt")
    assert [source.decode_utf8(x) for x in lines] == ["straße", "zwei", "", "東京 tags\u2028inside", "last"]
    with pytest.raises(FileNotFoundError, match="nope.txt: no such file"):
        tree.read_lines("nope.txt")
    assert tree.read_many(["f.txt", "nope.txt"]) == [text, None]


def test_path_under_keeps_data_paths_inside_their_root():
    cases = {
        ("/data/imgs", "a/b.jpg"): "a/b.jpg",
        ("/data/imgs", "a/../b.jpg"): "a/../b.jpg",
        ("/data/imgs", "../../etc/hostname"): None,
        ("/data/imgs", "a/../../b.jpg"): None,
        ("/data/imgs", "/data/imgs/a/b.jpg"): "a/b.jpg",
        ("/data/imgs", "/data/imgs/../secret.jpg"): None,
        ("/data/imgs", "/data/imgsX/b.jpg"): None,  # a sibling that shares the prefix
        ("/data/imgs", "/etc/hostname"): None,
        ("/data/imgs", "s3://bucket/data/imgs/a.jpg"): None,
        ("s3://bucket/imgs", "a//b.jpg"): "a//b.jpg",  # two keys on S3: not normalised
        ("s3://bucket/imgs", "s3://bucket/imgs/a.jpg"): "a.jpg",
        ("s3://bucket/imgs/", "s3://other-bucket/imgs/a.jpg"): None,
        ("s3://bucket/imgs", "s3://bucket/imgs/../x.jpg"): None,
        ("s3://bucket/imgs", "../x.jpg"): None,
        ("s3://bucket/imgs", "/imgs/a.jpg"): None,
    }
    assert {k: source.path_under(*k) for k in cases} == cases


# -- images -----------------------------------------------------------------------------------


def test_check_image_reasons():
    good = jpeg()
    opts = ImageOptions()
    assert check_image(good, opts) == (("ok", good, "", len(good)))
    assert check_image(good[: len(good) // 2], opts).status == "image_truncated"
    assert check_image(b"", opts).status == "image_undecodable"
    bad = check_image(b"GIF89a but not really", opts)
    assert bad.status == "image_undecodable" and bad.data is None and "0x" not in bad.detail
    png = io.BytesIO()
    Image.new("RGBA", (64, 32), (1, 2, 3, 4)).save(png, format="PNG")
    res = check_image(png.getvalue(), ImageOptions(max_side=16, jpeg_quality=75))
    img = Image.open(io.BytesIO(res.data))
    assert res.status == "ok" and img.format == "JPEG" and img.size == (16, 8)
    assert check_image(png.getvalue(), ImageOptions(max_side=16, jpeg_quality=75)).data == res.data
    with pytest.raises(ValueError, match="--max-side"):
        ImageOptions(max_side=2)
