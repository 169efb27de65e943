"""jobs/prepare_data.py on small generated trees of every input layout.

Each fixture tree is built file by file here (tiny JPEGs, corrupt and missing ones, Windows line
endings, non-ASCII tags), with the expected rows written out independently of the code under
test; outputs are checked with the format's own validator (scan_dataset) and by reading them back.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dcgh_dist.data.format import read_dataset_info, scan_dataset
from dcgh_dist.data.prepare import PrepareError, verify_manifest

REPO = Path(__file__).resolve().parents[1]


from dcgh_dist.jobs import prepare_data as JOB  # noqa: E402, N812


def run(*args: str) -> dict:
    return JOB.main([*args, "--no-progress"])


def jpeg(seed: int, size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write(path: Path, data: bytes | str, crlf: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        if crlf:
            data = data.replace("\n", "\r\n")
        data = data.encode("utf-8")
    path.write_bytes(data)


def read_rows(uri: str) -> dict[int, dict]:
    scan = scan_dataset(uri)
    rows = {}
    for f in scan.files:
        for r in pq.read_table(f).to_pylist():
            rows[r["id"]] = r
    return rows


def expected_splits(ids, seed: int, query: int, val: int, train: int) -> dict[int, str]:
    """The documented rule, re-implemented: order by blake2b-64("seed:id"), then fill in turn."""
    order = sorted(ids, key=lambda i: (hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), i))
    names = ["query"] * query + ["val"] * val + ["train"] * train
    return {i: (names[k] if k < len(names) else "db") for k, i in enumerate(order)}


def report_of(out: Path) -> dict:
    return json.loads((out / "prepare_report.json").read_text(encoding="utf-8"))


def firsts(report: dict, reason: str) -> list:
    return [e["id"] for e in report["reasons"][reason]["first"]]


# ---------------------------------------------------------------------------------------------
# MIRFLICKR-25K (raw)

MIR_CONCEPTS = (
    "animals", "baby", "bird", "car", "clouds", "dog", "female", "flower", "food", "indoor",
    "lake", "male", "night", "people", "plant_life", "portrait", "river", "sea", "sky",
    "structures", "sunset", "transport", "tree", "water",
)


def mir_tags(n: int) -> list[str]:
    tags = ["sky"]
    if n % 2 == 0:
        tags.append("straße")
    if n % 3 == 0:
        tags.append("東京")
    tags += [f"rare{n}", "sky"]  # a repeated tag is kept once
    return tags


def mir_labels(n: int) -> list[int]:
    return sorted({n % 4} | ({23} if n % 5 == 0 else set()))


def build_mirflickr(root: Path) -> dict[int, tuple[list[int], str]]:
    """30 images; returns the expected kept rows: id -> (labels, text)."""
    members: dict[int, list[int]] = {c: [] for c in range(24)}
    for n in range(1, 31):
        if n != 3:  # image 3 has no label
            for c in mir_labels(n):
                members[c].append(n)
        tags = ["rare4"] if n == 4 else mir_tags(n)
        if n != 5:  # image 5 has no tag file
            data = "\n".join(tags) + "\n"
            if n == 10:
                write(root / f"mirflickr/meta/tags/tags{n}.txt", "café\n".encode("latin-1"))
            else:
                write(root / f"mirflickr/meta/tags/tags{n}.txt", data, crlf=True)
        if n == 6:
            continue  # image file missing
        img = jpeg(n)
        if n == 7:
            img = img[: len(img) // 2]  # truncated
        elif n == 8:
            img = b"this is not a jpeg at all" * 4
        elif n == 9:
            img = b""
        write(root / f"mirflickr/im{n}.jpg", img)
    for c, name in enumerate(MIR_CONCEPTS):
        lines = [str(n) for n in members[c]]
        if name == "animals":
            lines.insert(1, "abc")  # not an image number
        if name == "baby":
            lines.append("999")  # no such image
        text = "\n".join(lines) + ("\n" if lines else "")
        data = text.replace("\n", "\r\n").encode()
        if name == "bird":
            data = b"\xef\xbb\xbf" + data  # a BOM
        write(root / f"mirflickr25k_annotations_v080/{name}.txt", data)
    # The "relevant" subsets and the README are not label files.
    write(root / "mirflickr25k_annotations_v080/baby_r1.txt", "11\n")
    write(root / "mirflickr25k_annotations_v080/README.txt", "annotations v080\n")
    expected = {}
    vocab = {"sky", "straße", "東京"}  # the tags in >= 3 images
    for n in range(1, 31):
        if n in (3, 4, 5, 6, 7, 8, 9, 10):
            continue
        kept = list(dict.fromkeys(t for t in mir_tags(n) if t in vocab))
        expected[n] = (mir_labels(n), " ".join(kept))
    return expected


@pytest.fixture(scope="module")
def mir_tree(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("mir_raw")
    return root, build_mirflickr(root)


MIR_ARGS = ("--query", "4", "--val", "2", "--train", "8", "--min-tag-images", "3")


def test_mirflickr_raw_rows_labels_text_splits_and_report(mir_tree, tmp_path):
    root, expected = mir_tree
    out = tmp_path / "mir"
    summary = run("--dataset", "mirflickr25k", "--input", str(root), "--output", str(out), *MIR_ARGS, "--workers", "0")

    info = read_dataset_info(str(out))
    assert info.num_classes == 24 and info.class_names == MIR_CONCEPTS
    rows = read_rows(str(out))
    assert sorted(rows) == sorted(expected)  # 22 pairs
    for n, (labels, text) in expected.items():
        assert rows[n]["labels"] == labels, n
        assert rows[n]["text"] == text, n
        assert rows[n]["image"] == jpeg(n)  # original bytes, untouched
    assert rows[12]["text"] == "sky straße 東京"
    want = expected_splits(expected, 0, 4, 2, 8)
    assert {n: r["split"] for n, r in rows.items()} == want
    assert summary["split_rows"] == {"query": 4, "val": 2, "train": 8, "db": 8}

    rep = report_of(out)
    assert rep["status"] == "ok" and rep["unaccounted"] == 0 and rep["source_items"] == 30
    counts = {k: v["count"] for k, v in rep["reasons"].items()}
    assert counts == {
        "no_label": 1, "no_frequent_tag": 1, "tags_missing": 1, "image_missing": 1, "image_truncated": 1,
        "image_undecodable": 2, "text_not_utf8": 1, "annotation_bad_line": 1, "annotation_unknown_image": 1,
    }
    assert firsts(rep, "no_label") == [3] and firsts(rep, "no_frequent_tag") == [4]
    assert firsts(rep, "tags_missing") == [5] and firsts(rep, "image_missing") == [6]
    assert firsts(rep, "image_truncated") == [7] and firsts(rep, "image_undecodable") == [8, 9]
    assert firsts(rep, "text_not_utf8") == [10] and firsts(rep, "annotation_unknown_image") == [999]
    assert rep["reasons"]["image_missing"]["kind"] == "error"
    assert rep["reasons"]["no_label"]["kind"] == "protocol"
    assert rep["reasons"]["image_missing"]["first"][0]["source"] == "mirflickr/im6.jpg"
    assert verify_manifest(str(out)) == []


def test_mirflickr_missing_concept_file_names_it(mir_tree, tmp_path):
    root, _ = mir_tree
    broken = tmp_path / "broken"
    for p in root.rglob("*"):
        if p.is_file() and p.name != "sunset.txt":
            write(broken / p.relative_to(root), p.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"mirflickr25k_annotations_v080/sunset\.txt"):
        run("--dataset", "mirflickr25k", "--input", str(broken), "--output", str(tmp_path / "o"), *MIR_ARGS, "--workers", "0")


def copy_tree(src: Path, dst: Path) -> Path:
    for p in src.rglob("*"):
        if p.is_file():
            write(dst / p.relative_to(src), p.read_bytes())
    return dst


@pytest.mark.parametrize("extra", ["mirflickr/im01.jpg", "mirflickr/meta/tags/tags01.txt"])
def test_mirflickr_two_files_for_one_image_number_are_an_error(mir_tree, tmp_path, extra):
    root, _ = mir_tree
    tree = copy_tree(root, tmp_path / "raw")
    same = {"mirflickr/im01.jpg": "mirflickr/im1.jpg", "mirflickr/meta/tags/tags01.txt": "mirflickr/meta/tags/tags1.txt"}
    write(tree / extra, (tree / same[extra]).read_bytes())
    name, other = extra.rsplit("/", 1)[1], same[extra].rsplit("/", 1)[1]
    with pytest.raises(ValueError, match=rf"/{name} and .*/{other} are both for image number 1"):
        run("--dataset", "mirflickr25k", "--input", str(tree), "--output", str(tmp_path / "o"), *MIR_ARGS,
            "--workers", "0")
    # Alone, a zero-padded name is image 1 under its own name (it was reported missing as im1.jpg).
    (tree / same[extra]).unlink()
    run("--dataset", "mirflickr25k", "--input", str(tree), "--output", str(tmp_path / "o"), *MIR_ARGS, "--workers", "0")
    assert read_rows(str(tmp_path / "o"))[1]["image"] == jpeg(1)


def test_same_command_gives_identical_bytes_whatever_the_worker_count(mir_tree, tmp_path):
    """In-process vs two spawned workers, and a re-run over the first output: same bytes."""
    root, _ = mir_tree
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("--dataset", "mirflickr25k", "--input", str(root), *MIR_ARGS, "--shard-size", "2KB", "--chunk-size", "3")
    run(*common, "--output", str(a), "--workers", "0")
    run(*common, "--output", str(b), "--workers", "2")
    files_a = sorted(p.name for p in a.iterdir())
    assert files_a == sorted(p.name for p in b.iterdir())
    shards = [f for f in files_a if f.endswith(".parquet")]
    assert len(shards) >= 3  # small shards: the boundaries are part of what must match
    for f in shards + ["dataset.json"]:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ra, rb = report_of(a), report_of(b)
    ra.pop("output"), rb.pop("output")
    assert ra == rb

    before = {f: (a / f).read_bytes() for f in files_a}
    with pytest.raises(ValueError, match="--overwrite"):
        run(*common, "--output", str(a), "--workers", "0")
    run(*common, "--output", str(a), "--workers", "0", "--overwrite")
    assert {f: (a / f).read_bytes() for f in sorted(p.name for p in a.iterdir())} == before

    # The manifest lists each shard with its rows and checksum.
    manifest = read_dataset_info(str(a)).extra["manifest"]
    assert [s["path"] for s in manifest["shards"]] == shards
    assert sum(s["rows"] for s in manifest["shards"]) == 22 == manifest["total_rows"]
    for s in manifest["shards"]:
        assert hashlib.sha256((a / s["path"]).read_bytes()).hexdigest() == s["sha256"]

    # Another seed, other splits (the same rows).
    c = tmp_path / "c"
    run(*common, "--output", str(c), "--workers", "0", "--seed", "1")
    rows_a, rows_c = read_rows(str(a)), read_rows(str(c))
    assert sorted(rows_a) == sorted(rows_c)
    assert {n: r["split"] for n, r in rows_c.items()} == expected_splits(rows_c, 1, 4, 2, 8)
    assert {n: r["split"] for n, r in rows_a.items()} != {n: r["split"] for n, r in rows_c.items()}


def test_max_side_shrinks_only_larger_images(tmp_path):
    root, images = tmp_path / "lst", tmp_path / "elsewhere"
    write(images / "imgs/big.jpg", jpeg(1, size=(200, 100)))
    write(images / "imgs/small.jpg", jpeg(2, size=(40, 30)))
    write(root / "all_imgs.txt", "imgs/big.jpg\nimgs/small.jpg\n")
    write(root / "all_tags.txt", "a big one\na small one\n")
    write(root / "all_labels.txt", "1 0\n0 1\n")
    out = tmp_path / "out"
    run("--dataset", "tiny", "--layout", "list", "--input", str(root), "--image-root", str(images),
        "--output", str(out), "--query", "1", "--train", "1", "--max-side", "50", "--jpeg-quality", "80",
        "--workers", "0")
    rows = {r["text"]: r for r in read_rows(str(out)).values()}
    big = Image.open(io.BytesIO(rows["a big one"]["image"]))
    assert big.format == "JPEG" and big.size == (50, 25)
    assert rows["a small one"]["image"] == jpeg(2, size=(40, 30))


# ---------------------------------------------------------------------------------------------
# NUS-WIDE (raw)

NUS_CONCEPTS = ("airport", "animal", "beach", "bear", "birds", "boats", "book", "bridge", "buildings",
                "cars", "castle", "cat")
NUS_TOP10 = NUS_CONCEPTS[:10]  # by count, ties by name: castle and cat lose the tie at 2


def build_nuswide(root: Path, text_mode: str) -> dict[int, tuple[list[int], str]]:
    n = 26
    col = {c: ["0"] * n for c in NUS_CONCEPTS}
    for i in range(24):
        col[NUS_CONCEPTS[i % 10]][i] = "1"
    col["castle"][0] = col["castle"][25] = "1"  # castle: 2 images; image 25 has only castle
    col["cat"][1] = col["cat"][2] = "1"
    col["airport"][5] = "x"  # malformed value in a kept concept: row 5 skipped
    col["castle"][6] = "?"  # malformed value in a dropped concept: ignored, row 6 kept
    for c in NUS_CONCEPTS:
        write(root / f"Groundtruth/AllLabels/Labels_{c}.txt", "\n".join(col[c]) + "\n", crlf=True)
    write(root / "ConceptsList/Concepts81.txt", "\n".join(NUS_CONCEPTS) + "\n", crlf=True)
    dirs = ["actor", "zebra", "water"]
    lines, tag_lines, bow = [], [], []
    vocab = ["sky", "café", "night"]
    for i in range(n):
        d, name = dirs[i % 3], f"{i:04d}_{1000 + i}.jpg"
        prefix = "C:\\ImageData\\Flickr\\" if i == 11 else ""
        lines.append(f"{prefix}{d}\\{name}")
        if i != 10:  # image 10 missing
            write(root / "Flickr" / d / name, jpeg(i))
        pid = 1000 + i if i != 7 else 4242  # line 7 belongs to another photo
        tags = "" if i == 8 else f" tag{i} sky café"
        tag_lines.append(f"{pid}{tags}")
        if i == 7:
            bow.append("1\t0")  # wrong number of columns
        elif i == 8:
            bow.append("0\t0\t0")
        else:
            bow.append("1\t1\t0" if i % 2 else "0 1 1")
    write(root / "ImageList/Imagelist.txt", "\n".join(lines) + "\n", crlf=True)
    if text_mode == "alltags":
        write(root / "NUS_WID_Tags/All_Tags.txt", "\n".join(tag_lines) + "\n", crlf=True)
    else:
        write(root / "NUS_WID_Tags/TagList1k.txt", "\n".join(vocab) + "\n", crlf=True)
        write(root / "NUS_WID_Tags/AllTags1k.txt", "\n".join(bow) + "\n", crlf=True)
    expected = {}
    for i in range(24):
        if i in (5, 7, 8, 10):
            continue
        text = f"tag{i} sky café" if text_mode == "alltags" else ("sky café" if i % 2 else "café night")
        expected[i] = ([i % 10], text)
    return expected


@pytest.mark.parametrize("text_mode", ["alltags", "tags1k"])
def test_nuswide_top10_raw(tmp_path, text_mode):
    root = tmp_path / "nus"
    expected = build_nuswide(root, text_mode)
    out = tmp_path / "out"
    summary = run("--dataset", "nuswide-top10", "--input", str(root), "--output", str(out), "--query", "3",
                  "--val", "2", "--train", "6", "--workers", "0")
    info = read_dataset_info(str(out))
    assert info.class_names == NUS_TOP10
    rows = read_rows(str(out))
    assert {i: (r["labels"], r["text"]) for i, r in rows.items()} == expected
    assert rows[11]["image"] == jpeg(11)  # the C:\ImageData\Flickr\ prefix is dropped
    assert {i: r["split"] for i, r in rows.items()} == expected_splits(expected, 0, 3, 2, 6)
    assert summary["split_rows"] == {"query": 3, "val": 2, "train": 6, "db": 9}

    rep = report_of(out)
    counts = {k: v["count"] for k, v in rep["reasons"].items()}
    text_reason = {"alltags": "tags_misaligned", "tags1k": "tags_malformed"}[text_mode]
    assert counts == {"label_row_malformed": 1, text_reason: 1, "empty_text": 1, "image_missing": 1,
                      "no_label": 2, "annotation_bad_line": 1}
    assert firsts(rep, "label_row_malformed") == [5] and firsts(rep, text_reason) == [7]
    assert firsts(rep, "empty_text") == [8] and firsts(rep, "image_missing") == [10]
    assert firsts(rep, "no_label") == [24, 25]
    assert "Labels_airport.txt" in rep["reasons"]["label_row_malformed"]["first"][0]["detail"]
    assert rep["unaccounted"] == 0 and rep["source_items"] == 26


def test_nuswide_label_file_that_does_not_line_up_is_an_error(tmp_path):
    root = tmp_path / "nus"
    build_nuswide(root, "alltags")
    write(root / "Groundtruth/AllLabels/Labels_bear.txt", "0\n1\n0\n")
    with pytest.raises(ValueError, match=r"Labels_bear\.txt has 3 lines but ImageList/Imagelist\.txt has 26"):
        run("--dataset", "nuswide-top10", "--input", str(root), "--output", str(tmp_path / "o"), "--workers", "0")


# ---------------------------------------------------------------------------------------------
# MS-COCO 2017 (raw)

COCO_CATS = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 7, "name": "dog"},
             {"id": 3, "name": "car"}]  # out of order on purpose: classes follow category ids


def build_coco(root: Path) -> dict[int, tuple[list[int], list[str]]]:
    """Returns image id -> (labels, captions in annotation-id order) of the kept images."""
    cat_of = {0: 1, 1: 3, 2: 7, 3: 90}  # class index -> category id
    expected = {}
    for split, ids in (("train2017", range(10, 22)), ("val2017", range(100, 106))):
        images, caps, inst = [], [], []
        for iid in ids:
            fname = f"{iid:012d}.jpg"
            images.append({"id": iid, "file_name": fname, "width": 16, "height": 12})
            if iid != 100:  # missing image file
                write(root / split / fname, jpeg(iid))
            labels = sorted({iid % 4, (iid // 4) % 4})
            if iid != 11:  # image 11: no instance annotation
                for k, c in enumerate(labels):
                    inst.append({"id": iid * 10 + k, "image_id": iid, "category_id": cat_of[c], "iscrowd": 0})
            texts = [f"caption {j} of image {iid} with ünïcode" for j in range(3)]
            if iid == 12:
                texts = []  # no caption
            if iid == 13:
                texts = ["   ", "\n"]  # whitespace only
            if iid == 14:
                # listed out of id order: "first" is the smallest annotation id
                caps += [{"id": 503, "image_id": 14, "caption": "third"},
                         {"id": 501, "image_id": 14, "caption": "  the   first\ncaption "},
                         {"id": 502, "image_id": 14, "caption": "second"}]
                texts_sorted = ["the first caption", "second", "third"]
            else:
                caps += [{"id": iid * 10 + j, "image_id": iid, "caption": t} for j, t in enumerate(texts)]
                texts_sorted = [" ".join(t.split()) for t in texts if t.strip()]
            if iid not in (11, 12, 13, 100):
                expected[iid] = (labels, texts_sorted)
        inst.append({"id": 1, "image_id": ids[5], "category_id": 55, "iscrowd": 0})  # unknown category
        caps.append({"id": 2, "image_id": 999, "caption": "an image that does not exist"})
        write(root / "annotations" / f"captions_{split}.json", json.dumps({"images": images, "annotations": caps}))
        write(root / "annotations" / f"instances_{split}.json",
              json.dumps({"images": images, "annotations": inst, "categories": COCO_CATS}))
    return expected


@pytest.fixture(scope="module")
def coco_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_raw")
    return root, build_coco(root)


def test_coco_raw_first_caption(coco_tree, tmp_path):
    root, expected = coco_tree
    out = tmp_path / "coco"
    run("--dataset", "coco", "--input", str(root), "--output", str(out), "--query", "2", "--val", "1",
        "--train", "4", "--workers", "0")
    info = read_dataset_info(str(out))
    assert info.class_names == ("person", "car", "dog", "toothbrush")
    rows = read_rows(str(out))
    assert {i: (r["labels"], r["text"]) for i, r in rows.items()} == {i: (l, c[0]) for i, (l, c) in expected.items()}
    assert rows[14]["text"] == "the first caption"
    assert rows[101]["image"] == jpeg(101)
    assert {i: r["split"] for i, r in rows.items()} == expected_splits(expected, 0, 2, 1, 4)
    rep = report_of(out)
    counts = {k: v["count"] for k, v in rep["reasons"].items()}
    assert counts == {"no_label": 1, "empty_text": 2, "image_missing": 1, "annotation_unknown_category": 2,
                      "annotation_unknown_image": 2}
    assert firsts(rep, "no_label") == [11] and firsts(rep, "empty_text") == [12, 13]
    assert firsts(rep, "image_missing") == [100]
    assert rep["unaccounted"] == 0 and rep["source_items"] == 18


def test_coco_raw_one_row_per_caption_keeps_an_image_in_one_split(coco_tree, tmp_path):
    root, expected = coco_tree
    out = tmp_path / "coco_all"
    summary = run("--dataset", "coco", "--input", str(root), "--output", str(out), "--query", "2", "--val", "1",
                  "--train", "4", "--coco-captions", "all", "--workers", "0")
    rows = read_rows(str(out))
    want = {iid * 100 + k: (labels, c) for iid, (labels, caps) in expected.items() for k, c in enumerate(caps)}
    assert {i: (r["labels"], r["text"]) for i, r in rows.items()} == want
    image_split = expected_splits(expected, 0, 2, 1, 4)
    assert {i: r["split"] for i, r in rows.items()} == {i: image_split[i // 100] for i in want}
    assert summary["split_items"] == {"query": 2, "val": 1, "train": 4, "db": len(expected) - 7}
    assert summary["rows_written"] == len(want)

    joined = tmp_path / "coco_join"
    run("--dataset", "coco", "--input", str(root), "--output", str(joined), "--query", "2", "--val", "1",
        "--train", "4", "--coco-captions", "join", "--workers", "0")
    rows = read_rows(str(joined))
    assert {i: r["text"] for i, r in rows.items()} == {i: " ".join(c) for i, (_, c) in expected.items()}
    assert rows[14]["text"] == "the first caption second third"


# ---------------------------------------------------------------------------------------------
# The list layout


def build_list(root: Path) -> dict[int, tuple[list[int], str, str]]:
    """Returns row id -> (labels, text, image path) of the kept rows."""
    imgs, tags, labs = [], [], []
    for i in range(20):
        path = f"imgs\\{i}.jpg" if i != 9 else "imgs\\8.jpg"  # rows 8 and 9: one image, two texts
        if i == 11:
            path = ""
        imgs.append(path)
        tags.append(f"tag{i},straße,東京 café")
        labs.append(" ".join("1" if (i + j) % 3 == 0 else "0" for j in range(4)))
        if i not in (6, 9, 11):
            write(root / f"imgs/{i}.jpg", jpeg(i))
    labs[3] = "1 0 1"  # wrong number of columns
    labs[4] = "0 0 0 0"  # no label
    tags[5] = "   "  # empty text
    labs[10] = "1,0,0,1"  # comma-separated is fine
    labs[12] = "1.0 0.0 0 1"  # so are floats
    labs[13] = "2 0 0 0"  # not 0/1
    expected = {}
    for i in range(20):
        if i in (3, 4, 5, 6, 7, 11, 13):
            continue
        labels = [j for j, v in enumerate(labs[i].replace(",", " ").split()) if float(v) == 1.0]
        expected[i] = (labels, f"tag{i},straße,東京 café", f"imgs/{8 if i == 9 else i}.jpg")
    write(root / "all_imgs.txt", "\n".join(imgs) + "\n", crlf=True)
    tag_bytes = ("\n".join(tags) + "\n").replace("\n", "\r\n").encode("utf-8").split(b"\r\n")
    tag_bytes[7] = b"\xff\xfe not utf-8"
    write(root / "all_tags.txt", b"\xef\xbb\xbf" + b"\r\n".join(tag_bytes))
    write(root / "all_labels.txt", "\n".join(labs) + "\n", crlf=True)
    write(root / "class_names.txt", "sun\nmoon\nstar\ncloud\n", crlf=True)
    return expected


@pytest.fixture(scope="module")
def list_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("list")
    return root, build_list(root)


LIST_ARGS = ("--dataset", "tiny", "--layout", "list", "--query", "2", "--val", "1", "--train", "4")


def test_list_layout(list_tree, tmp_path):
    root, expected = list_tree
    out = tmp_path / "out"
    summary = run(*LIST_ARGS, "--input", str(root), "--output", str(out), "--workers", "0")
    assert read_dataset_info(str(out)).class_names == ("sun", "moon", "star", "cloud")
    rows = read_rows(str(out))
    assert {i: (r["labels"], r["text"]) for i, r in rows.items()} == {i: e[:2] for i, e in expected.items()}
    assert rows[9]["image"] == rows[8]["image"] == jpeg(8)
    assert rows[8]["split"] == rows[9]["split"]  # one image: one split
    items = {i: None for i in expected if i != 9}  # items are named by their first row
    item_split = expected_splits(items, 0, 2, 1, 4)
    assert {i: r["split"] for i, r in rows.items()} == {i: item_split[8 if i == 9 else i] for i in expected}
    assert summary["split_items"] == {"query": 2, "val": 1, "train": 4, "db": 5}

    rep = report_of(out)
    counts = {k: v["count"] for k, v in rep["reasons"].items()}
    assert counts == {"label_row_malformed": 2, "no_label": 1, "empty_text": 1, "image_missing": 1,
                      "text_not_utf8": 1, "image_path_empty": 1}
    assert firsts(rep, "label_row_malformed") == [3, 13] and firsts(rep, "no_label") == [4]
    assert firsts(rep, "empty_text") == [5] and firsts(rep, "image_missing") == [6]
    assert firsts(rep, "text_not_utf8") == [7] and firsts(rep, "image_path_empty") == [11]
    assert rep["unit"] == "line" and rep["unaccounted"] == 0 and rep["source_items"] == 20


def test_list_layout_uses_preset_class_names_and_column_count(tmp_path):
    root = tmp_path / "lst"
    for i in range(3):
        write(root / f"{i}.jpg", jpeg(i))
    write(root / "all_imgs.txt", "0.jpg\n1.jpg\n2.jpg\n")
    write(root / "all_tags.txt", "a,b\nc\nd\n")
    write(root / "all_labels.txt", "\n".join(" ".join("1" if j == i else "0" for j in range(24)) for i in range(3)))
    out = tmp_path / "out"
    run("--dataset", "mirflickr25k", "--input", str(root), "--output", str(out), "--query", "1", "--val", "0",
        "--train", "1", "--workers", "0")
    assert read_dataset_info(str(out)).class_names == MIR_CONCEPTS
    assert {i: r["labels"] for i, r in read_rows(str(out)).items()} == {0: [0], 1: [1], 2: [2]}
    with pytest.raises(ValueError, match="24 columns but the coco preset has 80 classes"):
        run("--dataset", "coco", "--input", str(root), "--output", str(tmp_path / "o2"), "--workers", "0")


def test_list_files_that_do_not_line_up_are_an_error(tmp_path):
    root = tmp_path / "lst"
    write(root / "all_imgs.txt", "a.jpg\nb.jpg\nc.jpg\n")
    write(root / "all_tags.txt", "x\ny\n\n\n")  # trailing blank lines do not count
    write(root / "all_labels.txt", "1 0\n0 1\n1 1\n")
    with pytest.raises(ValueError, match="all_imgs.txt has 3 lines, all_tags.txt 2, all_labels.txt 3"):
        run(*LIST_ARGS, "--input", str(root), "--output", str(tmp_path / "o"), "--workers", "0")


def build_wide_labels(root: Path, n: int, wide: int) -> None:
    """A list tree whose first ``wide`` label rows have a column too many."""
    for i in range(n):
        write(root / f"{i}.jpg", jpeg(i))
    write(root / "all_imgs.txt", "".join(f"{i}.jpg\n" for i in range(n)))
    write(root / "all_tags.txt", "".join(f"text {i}\n" for i in range(n)))
    write(root / "all_labels.txt", "".join("1 0 1\n" if i < wide else "1 0\n" for i in range(n)))


def test_malformed_label_rows_warn_with_counts_and_stop_the_job_when_many(tmp_path, caplog):
    few = tmp_path / "few"
    build_wide_labels(few, 120, 3)
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        run(*LIST_ARGS, "--input", str(few), "--output", str(out), "--workers", "0")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("3 skipped (label_row_malformed)" in m and "first: id 0" in m and "'1 0 1'" in m for m in warned), warned
    assert read_dataset_info(str(out)).num_classes == 2

    # 61 of 120 rows one column too wide: the file is read wrongly, not damaged here and there.
    many = tmp_path / "many"
    build_wide_labels(many, 120, 61)
    with pytest.raises(PrepareError, match=r"59 of the 120 lines of the input have broken metadata, more than "
                                           r"--max-image-errors 0\.05 allows; most are label_row_malformed"):
        run(*LIST_ARGS, "--input", str(many), "--output", str(tmp_path / "o2"), "--workers", "0")
    assert report_of(tmp_path / "o2")["status"] == "failed"
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == ["prepare_report.json"]


def test_list_image_paths_must_stay_under_the_image_root(tmp_path):
    images = tmp_path / "images"
    root = tmp_path / "lst"
    write(images / "a.jpg", jpeg(1))
    write(images / "sub/b.jpg", jpeg(2))
    write(tmp_path / "secret.jpg", jpeg(3))  # beside the image root: must not be read
    write(root / "all_tags.txt", "one\ntwo\n")
    write(root / "all_labels.txt", "1 0\n0 1\n")
    common = ("--dataset", "tiny", "--layout", "list", "--input", str(root), "--image-root", str(images),
              "--query", "1", "--train", "1", "--workers", "0")
    for bad in ("../secret.jpg", "sub/../../secret.jpg", "..\\secret.jpg", str(tmp_path / "secret.jpg"),
                f"{images}/../secret.jpg", "/etc/hostname", "s3://other-bucket/a.jpg"):
        write(root / "all_imgs.txt", f"a.jpg\n{bad}\n")
        with pytest.raises(ValueError, match=r"all_imgs\.txt line 2: image path .* is outside the image root"):
            run(*common, "--output", str(tmp_path / "o"))
        assert not (tmp_path / "o").exists()  # refused before anything is written
    # Absolute paths under the root, and '..' that stays inside, are fine.
    write(root / "all_imgs.txt", f"{images}/sub/b.jpg\nsub/../a.jpg\n")
    run(*common, "--output", str(tmp_path / "ok"))
    assert sorted(r["image"] for r in read_rows(str(tmp_path / "ok")).values()) == sorted([jpeg(1), jpeg(2)])


def test_nuswide_and_coco_image_paths_must_stay_under_their_folder(coco_tree, tmp_path):
    nus = tmp_path / "nus"
    build_nuswide(nus, "alltags")
    lines = (nus / "ImageList/Imagelist.txt").read_bytes().split(b"\r\n")
    lines[3] = b"..\\..\\0003_1003.jpg"
    write(nus / "ImageList/Imagelist.txt", b"\r\n".join(lines))
    with pytest.raises(ValueError, match=r"Imagelist\.txt line 4: image path '\.\./0003_1003\.jpg' is outside"):
        run("--dataset", "nuswide-top10", "--input", str(nus), "--output", str(tmp_path / "o"), "--workers", "0")

    root, _ = coco_tree
    coco = copy_tree(root, tmp_path / "coco")
    cap_file = coco / "annotations/captions_val2017.json"
    cap = json.loads(cap_file.read_text())
    cap["images"][1]["file_name"] = "../../etc/hostname"
    write(cap_file, json.dumps(cap))
    with pytest.raises(ValueError, match=r"captions_val2017\.json: image 101 has file_name '\.\./\.\./etc/hostname', "
                                         r"outside the image folder"):
        run("--dataset", "coco", "--input", str(coco), "--output", str(tmp_path / "o"), "--workers", "0")


# ---------------------------------------------------------------------------------------------
# Layout detection, output and failure handling


def test_layout_not_found_says_which_file_was_expected(list_tree, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"annotations/captions_train2017\.json.*all_imgs\.txt"):
        run("--dataset", "coco", "--input", str(empty), "--output", str(tmp_path / "o"))
    root, _ = list_tree
    with pytest.raises(FileNotFoundError, match=r"expected the MIRFLICKR-25K image folder .* at .*/mirflickr/"):
        run("--dataset", "mirflickr25k", "--layout", "raw", "--input", str(root), "--output", str(tmp_path / "o"),
            "--workers", "0")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run("--dataset", "coco", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))


def test_output_with_foreign_files_is_refused(list_tree, tmp_path):
    root, _ = list_tree
    out = tmp_path / "out"
    write(out / "notes.txt", "mine")
    with pytest.raises(ValueError, match=r"cannot prove it wrote \(notes\.txt: not a file"):
        run(*LIST_ARGS, "--input", str(root), "--output", str(out), "--workers", "0")
    assert (out / "notes.txt").read_text() == "mine"


def files_of(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def output_as_written(out: Path) -> dict:
    """Every file's bytes, but the report's, which names the output: parsed, without that."""
    files = files_of(out)
    report = json.loads(files.pop("prepare_report.json"))
    report.pop("output")
    return {**files, "prepare_report.json": report}


def test_overwrite_replaces_only_what_its_own_manifest_lists(list_tree, tmp_path):
    from dcgh_dist.data.format import DatasetInfo, write_dataset

    root, _ = list_tree
    out = tmp_path / "out"
    common = (*LIST_ARGS, "--input", str(root), "--output", str(out), "--workers", "0", "--shard-size", "2KB")
    run(*common)
    shards = sorted(p.name for p in out.glob("part-*.parquet"))
    assert len(shards) >= 2
    # Another tool's shard next to ours: the old regex took any part-NNNNN.parquet for the job's.
    write(out / "part-00042.parquet", (out / shards[0]).read_bytes())
    before = files_of(out)
    with pytest.raises(ValueError, match=r"part-00042\.parquet: not listed in a dataset\.json manifest or run record"):
        run(*common, "--overwrite")
    assert files_of(out) == before
    (out / "part-00042.parquet").unlink()
    # A listed shard whose size changed since the job wrote it is not the job's to delete either.
    with open(out / shards[1], "ab") as f:
        f.write(b"appended by hand")
    before = files_of(out)
    with pytest.raises(ValueError, match=rf"{shards[1]}: \d+ bytes, but dataset\.json's manifest says \d+"):
        run(*common, "--overwrite")
    assert files_of(out) == before

    # A dataset written by another writer (format.write_dataset: part-*.parquet + a dataset.json
    # without this job's manifest) is refused, with or without --overwrite, and left as it was.
    other = tmp_path / "other"
    write_dataset(str(other), DatasetInfo(name="x", num_classes=4, class_names=("a", "b", "c", "d")),
                  [{"id": 0, "labels": [0], "split": "train", "image": jpeg(0), "text": "x"}])
    before = files_of(other)
    for extra in ((), ("--overwrite",)):
        with pytest.raises(ValueError, match=r"dataset\.json: not a dataset\.json written by jobs/prepare_data\.py.*"
                                             r"part-00000\.parquet: not listed"):
            run(*LIST_ARGS, "--input", str(root), "--output", str(other), "--workers", "0", *extra)
    assert files_of(other) == before


def test_refusals_say_what_the_output_holds(list_tree, tmp_path):
    root, _ = list_tree
    out = tmp_path / "out"
    common = (*LIST_ARGS, "--input", str(root), "--output", str(out), "--workers", "0")
    run(*common)
    with pytest.raises(ValueError, match=r"already holds a complete prepared dataset \(dataset\.json and 1 shard"):
        run(*common)
    # Part files and no dataset.json: not "a prepared dataset", but files the job cannot claim.
    loose = tmp_path / "loose"
    write(loose / "part-00000.parquet", (out / "part-00000.parquet").read_bytes())
    with pytest.raises(ValueError, match=r"holds 1 file\(s\) that jobs/prepare_data\.py cannot prove it wrote "
                                         r"\(part-00000\.parquet: not listed"):
        run(*LIST_ARGS, "--input", str(root), "--output", str(loose), "--workers", "0", "--overwrite")
    assert (loose / "part-00000.parquet").exists()
    # The report a failed run leaves is replaced by the next run, without --overwrite.
    failed = tmp_path / "failed"
    with pytest.raises(PrepareError):
        run(*LIST_ARGS, "--input", str(root), "--output", str(failed), "--workers", "0", "--train", "40")
    assert sorted(files_of(failed)) == ["prepare_report.json"]
    run(*LIST_ARGS, "--input", str(root), "--output", str(failed), "--workers", "0")
    assert output_as_written(failed) == output_as_written(out)


_SLOW_JOB = """
import runpy, sys, time
from dcgh_dist.data.prepare import images
load = images.load_image
images.load_image = lambda *a: (time.sleep(0.04), load(*a))[1]  # an input slow enough to stop mid-run
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_stopped_run_leaves_no_partial_shard_and_the_rerun_gives_the_same_bytes(tmp_path, sig):
    import os
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "lst"
    n = 80
    for i in range(n):
        write(root / f"imgs/{i}.jpg", jpeg(i))
    write(root / "all_imgs.txt", "".join(f"imgs/{i}.jpg\n" for i in range(n)))
    write(root / "all_tags.txt", "".join(f"text {i}\n" for i in range(n)))
    write(root / "all_labels.txt", "".join(("1 0\n", "0 1\n")[i % 2] for i in range(n)))
    # About one row a shard: many shards, each moved to its name when done.
    args = [*LIST_ARGS, "--input", str(root), "--workers", "0", "--shard-size", "1KB", "--no-progress"]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_JOB, str(REPO / "jobs" / "prepare_data.py"), *args,
                             "--output", str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("part-*.parquet"))) < 3:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "no shard written in time"
            time.sleep(0.02)
        proc.send_signal(getattr(signal, sig))
        log = proc.communicate(timeout=120)[0].decode()
    finally:
        proc.kill()
    left = files_of(out)
    if sig == "SIGTERM":
        # Handled like Ctrl-C: the job deletes what it wrote and exits 128 + 15.
        assert proc.returncode == 143, log
        assert "SIGTERM: stopping" in log
        assert left == {}, sorted(left)
    else:
        assert proc.returncode == -signal.SIGKILL
        assert "dataset.json" not in left
        state = json.loads(left["_prepare_state.json"])
        finals = sorted(f for f in left if f.startswith("part-"))
        assert len(finals) >= 3
        for f in finals:  # a final name only ever holds a complete shard, listed with its size
            assert state["files"][f] == len(left[f])
            assert pq.read_metadata(out / f).num_rows == 1
        assert all(f.startswith(".") and state["run_id"] in f for f in left if f not in finals + ["_prepare_state.json"])
    # The re-run, without --overwrite: recognises the leftovers as its own, and writes what an
    # uninterrupted run writes.
    run(*args, "--output", str(out))
    clean = tmp_path / "clean"
    run(*args, "--output", str(clean))
    assert output_as_written(out) == output_as_written(clean)
    assert verify_manifest(str(out)) == []


def test_too_many_bad_images_stop_the_job_with_a_report(tmp_path):
    root = tmp_path / "lst"
    n = 30
    write(root / "all_imgs.txt", "".join(f"gone/{i}.jpg\n" for i in range(n)))  # no image exists
    write(root / "all_tags.txt", "".join(f"text {i}\n" for i in range(n)))
    write(root / "all_labels.txt", "1 0\n" * n)
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=r"11 of the first 11 images could not be used.*image root") as e:
        run(*LIST_ARGS, "--input", str(root), "--output", str(out), "--workers", "0", "--chunk-size", "4")
    assert e.value.report_path.endswith("prepare_report.json")
    rep = report_of(out)
    assert rep["status"] == "failed" and rep["reasons"]["image_missing"]["count"] == 11
    assert sorted(p.name for p in out.iterdir()) == ["prepare_report.json"]  # no shard, no dataset.json


def test_too_few_items_for_the_splits(list_tree, tmp_path):
    root, _ = list_tree
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match="only 13 items pass the checks, fewer than query \\+ val \\+ train = 30"):
        run("--dataset", "tiny", "--layout", "list", "--input", str(root), "--output", str(out),
            "--query", "10", "--train", "20", "--workers", "0")
    assert report_of(out)["status"] == "failed"
    assert not (out / "dataset.json").exists()


# ---------------------------------------------------------------------------------------------
# Presets: prepare_data's default output is where train.py looks


def test_presets_chain_prepare_and_train(mir_tree, tmp_path, monkeypatch):
    from dcgh_dist.config import DataConfig
    from dcgh_dist.data.presets import DATASET_PRESETS, preset_path, resolve_dataset

    monkeypatch.setenv("DCGH_DATA_ROOT", str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match="jobs/prepare_data.py --dataset mirflickr25k --input RAW_ROOT"):
        preset_path("mirflickr25k")
    root, _ = mir_tree
    summary = run("--dataset", "mirflickr25k", "--input", str(root), *MIR_ARGS, "--workers", "0")
    where = str(tmp_path / "data" / "mirflickr25k")
    assert summary["output"] == where
    assert preset_path("mirflickr25k") == where
    assert resolve_dataset(DataConfig(dataset="mirflickr25k")) == where
    assert DATASET_PRESETS["mirflickr25k"].num_classes == read_dataset_info(where).num_classes == 24
    # Paper split sizes are the defaults; val is half the query split.
    p = DATASET_PRESETS
    assert [(p[k].query, p[k].val, p[k].train) for k in ("mirflickr25k", "nuswide", "nuswide-top10", "coco")] == [
        (2000, 1000, 10000), (2100, 1050, 10500), (2100, 1050, 10500), (5000, 2500, 10000)]
    # jobs/train.py --dataset coco: the preset's run directory, the rest the authors' defaults.
    from dcgh_dist.jobs.train import build_config, parse_args

    cfg = build_config(parse_args(["--dataset", "coco"]))
    assert (cfg.data.dataset, cfg.train.output_dir) == ("coco", "runs/coco")
    args = JOB.parse_args(["--dataset", "coco", "--input", "/raw"])
    assert JOB.build_options(args).output == str(tmp_path / "data" / "coco")
    assert (JOB.build_options(args).query, JOB.build_options(args).train) == (None, None)  # -> preset's


def test_preset_with_other_class_count_is_refused(tmp_path, monkeypatch):
    from dcgh_dist.data.format import DatasetInfo, write_dataset
    from dcgh_dist.data.presets import preset_path

    monkeypatch.setenv("DCGH_DATA_ROOT", str(tmp_path))
    info = DatasetInfo(name="nuswide", num_classes=2, class_names=("a", "b"))
    write_dataset(str(tmp_path / "nuswide"), info, [{"id": 0, "labels": [0], "split": "train",
                                                     "image": jpeg(0), "text": "x"}])
    with pytest.raises(ValueError, match="2 classes but preset 'nuswide' has 21"):
        preset_path("nuswide")


# ---------------------------------------------------------------------------------------------
# S3: the same code path, both sides, against a real S3-compatible server


def test_s3_input_and_output_match_local_bytes(s3_server, list_tree, tmp_path):
    import pyarrow.fs as pafs

    from dcgh_dist.storage import resolve_filesystem

    endpoint, make_bucket = s3_server
    raw, data = make_bucket("prep-raw"), make_bucket("prep-data")
    root, expected = list_tree
    s3, _ = resolve_filesystem("s3://prep-raw", endpoint)
    pafs.copy_files(str(root), "prep-raw/list", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)

    local = tmp_path / "local"
    common = (*LIST_ARGS, "--shard-size", "2KB")
    run(*common, "--input", str(root), "--output", str(local), "--workers", "0")
    uri = f"{data}/tiny"
    summary = run(*common, "--input", f"{raw}/list", "--output", uri, "--s3-endpoint", endpoint, "--workers", "1")

    scan = scan_dataset(uri, endpoint)
    assert sum(scan.split_counts.values()) == len(expected) == summary["rows_written"]
    assert verify_manifest(uri, endpoint) == []
    out_fs, out_root = resolve_filesystem(uri, endpoint)
    shards = sorted(p.name for p in local.iterdir() if p.suffix == ".parquet")
    assert len(shards) >= 2
    for name in shards:  # S3 in, S3 out, a worker process: the same bytes as local, in-process
        with out_fs.open_input_stream(f"{out_root}/{name}") as f:
            assert f.read() == (local / name).read_bytes(), name
    with out_fs.open_input_stream(f"{out_root}/prepare_report.json") as f:
        rep = json.loads(f.read())
    assert rep["reasons"]["image_missing"]["first"][0]["id"] == 6
    assert rep["status"] == "ok" and rep["input"] == f"{raw}/list"


def test_s3_list_paths_outside_the_image_root_are_refused(s3_server, tmp_path):
    import pyarrow.fs as pafs

    from dcgh_dist.storage import resolve_filesystem

    endpoint, make_bucket = s3_server
    raw = make_bucket("prep-paths")
    s3, _ = resolve_filesystem(raw, endpoint)
    local = tmp_path / "lst"
    write(local / "imgs/a.jpg", jpeg(1))
    write(local / "all_tags.txt", "one\ntwo\n")
    write(local / "all_labels.txt", "1 0\n0 1\n")
    for bad in ("s3://other-bucket/imgs/a.jpg", "imgs/../../x.jpg", "s3://prep-paths/list/../x.jpg", "/etc/hostname"):
        write(local / "all_imgs.txt", f"imgs/a.jpg\n{bad}\n")
        pafs.copy_files(str(local), "prep-paths/list", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
        with pytest.raises(ValueError, match=r"all_imgs\.txt line 2: image path .* is outside the image root s3://prep-paths/list"):
            run("--dataset", "tiny", "--layout", "list", "--input", f"{raw}/list", "--output", str(tmp_path / "o"),
                "--s3-endpoint", endpoint, "--query", "1", "--train", "1", "--workers", "0")
    # An absolute key under the image root is the same image as its relative path.
    write(local / "all_imgs.txt", f"imgs/a.jpg\n{raw}/list/imgs/a.jpg\n")
    pafs.copy_files(str(local), "prep-paths/list", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
    summary = run("--dataset", "tiny", "--layout", "list", "--input", f"{raw}/list", "--output", str(tmp_path / "ok"),
                  "--s3-endpoint", endpoint, "--query", "1", "--train", "0", "--workers", "0")
    assert summary["split_items"]["query"] == 1 and summary["rows_written"] == 2
