"""NUS-WIDE from the original distribution.

Expected under ROOT (the names of the NUS-WIDE archives, unpacked)::

    ImageList/Imagelist.txt                    269,648 lines: actor\\0001_2124494179.jpg
    Groundtruth/AllLabels/Labels_{concept}.txt one 0/1 a line, line for line with Imagelist.txt
    NUS_WID_Tags/All_Tags.txt                  per-image tag lines: "2124494179 tag tag ..."
      or NUS_WID_Tags/TagList1k.txt + AllTags1k.txt   1,000-tag vocabulary and 0/1 rows
    Flickr/actor/0001_2124494179.jpg ...       the images (or images/, or --image-root)
    ConceptsList/Concepts81.txt                optional: the concept list to expect

Image paths are the last two components of each Imagelist line (backslashes allowed: the list
was written on Windows), looked up under the image folder; a ``..`` among them stops the job.

The usual protocol keeps the k most frequent concepts (21, or 10 for ``nuswide-top10``; counted
over all images, ties broken by name) and the images with at least one of them and non-empty
tags: 195,834 pairs for k = 21. Class indices follow the concepts' alphabetical order (the order
of Concepts81.txt). The text of a row is the image's Flickr tags from All_Tags.txt joined by spaces
(as in the CLIP-hashing codebases); with ``--nus-text tags1k`` it is the image's tags from the
1,000-tag vocabulary instead (the bag-of-words protocol of DCMH).
"""

from __future__ import annotations

import logging
import re

import numpy as np

from dcgh_dist.data.prepare.base import Candidate, LayoutOptions, Row, SourceScan
from dcgh_dist.data.prepare.report import SkipReport
from dcgh_dist.data.prepare.source import InputTree, decode_utf8, path_under, require_dir, require_file

logger = logging.getLogger(__name__)

NAME = "nuswide"
IMAGE_LIST = "ImageList/Imagelist.txt"
LABELS_DIR = "Groundtruth/AllLabels"
CONCEPTS_FILE = "ConceptsList/Concepts81.txt"
ALL_TAGS = "NUS_WID_Tags/All_Tags.txt"
TAGLIST_1K = "NUS_WID_Tags/TagList1k.txt"
ALLTAGS_1K = "NUS_WID_Tags/AllTags1k.txt"
IMAGE_DIRS = ("Flickr", "images", "Images", "image")
_LABEL_RE = re.compile(r"Labels_(.+)\.txt")
_PHOTO_RE = re.compile(r"\d+_(\d+)\.jpg", re.IGNORECASE)


def detect(tree: InputTree) -> bool:
    return tree.is_file(IMAGE_LIST) or tree.is_dir(LABELS_DIR)


def expected(tree: InputTree) -> str:
    return f"{tree.display(IMAGE_LIST)} and {tree.display(LABELS_DIR)}/ (raw NUS-WIDE)"


def _drop_trailing_blank(lines: list[bytes]) -> list[bytes]:
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _image_rel(line: bytes) -> str:
    """``C:\\ImageData\\Flickr\\actor\\0001_2.jpg`` or ``actor\\0001_2.jpg`` -> ``actor/0001_2.jpg``."""
    text = (decode_utf8(line) or "").strip().replace("\\", "/")
    parts = [p for p in text.split("/") if p]
    return "/".join(parts[-2:])


def _concepts(tree: InputTree) -> list[str]:
    present = {m.group(1) for name, _ in tree.list_files(LABELS_DIR) if (m := _LABEL_RE.fullmatch(name))}
    if tree.is_file(CONCEPTS_FILE):
        listed = [c for line in tree.read_lines(CONCEPTS_FILE) if (c := line.decode("utf-8").strip())]
        for c in listed:
            if c not in present:
                raise FileNotFoundError(
                    f"expected {tree.display(f'{LABELS_DIR}/Labels_{c}.txt')} (concept {c!r} of "
                    f"{CONCEPTS_FILE}), which does not exist"
                )
        return sorted(listed)
    if not present:
        raise FileNotFoundError(f"expected Labels_<concept>.txt files in {tree.display(LABELS_DIR)}/, found none")
    return sorted(present)


def _text_mode(tree: InputTree, mode: str) -> str:
    if mode == "auto":
        if tree.is_file(ALL_TAGS):
            return "alltags"
        if tree.is_file(TAGLIST_1K) and tree.is_file(ALLTAGS_1K):
            return "tags1k"
        raise FileNotFoundError(
            f"expected the NUS-WIDE tags at {tree.display(ALL_TAGS)} (or {tree.display(TAGLIST_1K)} with "
            f"{tree.display(ALLTAGS_1K)}), which do not exist"
        )
    if mode == "alltags":
        require_file(tree, ALL_TAGS, "the NUS-WIDE per-image tag lines")
    elif mode == "tags1k":
        require_file(tree, TAGLIST_1K, "the NUS-WIDE 1,000-tag list")
        require_file(tree, ALLTAGS_1K, "the NUS-WIDE 1,000-tag rows")
    else:
        raise ValueError(f"--nus-text must be auto, alltags or tags1k, got {mode!r}")
    return mode


def _image_root(tree: InputTree, opts: LayoutOptions) -> str:
    if opts.image_root:
        return opts.image_root
    for d in IMAGE_DIRS:
        if tree.is_dir(d):
            return tree.display(d)
    raise FileNotFoundError(
        f"expected the NUS-WIDE images at {tree.display(IMAGE_DIRS[0])}/<concept>/<file>.jpg, which does "
        "not exist (or pass --image-root)"
    )


def check(tree: InputTree, opts: LayoutOptions) -> tuple[list[str], str, str]:
    require_file(tree, IMAGE_LIST, "the NUS-WIDE image list")
    require_dir(tree, LABELS_DIR, "the NUS-WIDE concept ground truth")
    return _concepts(tree), _text_mode(tree, opts.nus_text), _image_root(tree, opts)


def _label_column(tree: InputTree, rel: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(is-1, is-malformed) for one Labels_*.txt; the whole file must line up with the list."""
    lines = _drop_trailing_blank(tree.read_lines(rel))
    if len(lines) != n:
        raise ValueError(
            f"{tree.display(rel)} has {len(lines)} lines but {IMAGE_LIST} has {n}: the ground-truth "
            "files must line up with the image list, line for line (a truncated download?)"
        )
    # Vectorised: almost every line is exactly "0" or "1"; only the others are stripped one by one.
    arr = np.array(lines, dtype=bytes) if n else np.array([], dtype="S1")
    ones, zeros = arr == b"1", arr == b"0"
    for i in np.flatnonzero(~(ones | zeros)):
        v = lines[i].strip()
        ones[i], zeros[i] = v == b"1", v == b"0"
    return ones, ~(ones | zeros)


def _parse_01_row(line: bytes, width: int) -> np.ndarray | None:
    """Column indices of the 1s in a whitespace-separated 0/1 row, or None if malformed."""
    b = np.frombuffer(line, dtype=np.uint8)
    digit = (b == 48) | (b == 49)
    # Fast path: single-character 0/1 tokens separated by spaces/tabs.
    if int(digit.sum()) == width and not (digit[1:] & digit[:-1]).any() and np.isin(b[~digit], (9, 32)).all():
        return np.flatnonzero(b[digit] == 49)
    toks = line.split()
    if len(toks) != width or any(t not in (b"0", b"1") for t in toks):
        return None
    return np.array([i for i, t in enumerate(toks) if t == b"1"], dtype=np.int64)


def scan(tree: InputTree, opts: LayoutOptions, report: SkipReport) -> SourceScan:
    concepts, text_mode, image_root = check(tree, opts)
    k = opts.top_k or 21
    if not 1 <= k <= len(concepts):
        raise ValueError(f"NUS-WIDE: top-k must be in 1..{len(concepts)}, got {k}")

    list_lines = _drop_trailing_blank(tree.read_lines(IMAGE_LIST))
    n = len(list_lines)
    rels = [_image_rel(ln) for ln in list_lines]
    photo_ids = [int(m.group(1)) if (m := _PHOTO_RE.fullmatch(r.rsplit("/", 1)[-1])) else None for r in rels]
    logger.info("NUS-WIDE: %d images listed, %d concepts; reading the ground truth", n, len(concepts))

    columns = {c: _label_column(tree, f"{LABELS_DIR}/Labels_{c}.txt", n) for c in concepts}
    counts = {c: int(ones.sum()) for c, (ones, _) in columns.items()}
    top = sorted(sorted(concepts, key=lambda c: (-counts[c], c))[:k])
    logger.info("NUS-WIDE top-%d concepts: %s", k, ", ".join(f"{c} ({counts[c]})" for c in top))
    label_matrix = np.stack([columns[c][0] for c in top], axis=1) if n else np.zeros((0, k), bool)
    malformed = np.zeros(n, dtype=bool)
    bad_in_top = {c: columns[c][1] for c in top}
    for c in concepts:
        bad = columns[c][1]
        if c in bad_in_top:
            malformed |= bad
        else:
            for i in np.flatnonzero(bad):
                report.add("annotation_bad_line", int(i), f"{LABELS_DIR}/Labels_{c}.txt:{i + 1}",
                           "not 0/1 (concept not among the kept ones: read as 0)")
    del columns

    # Text, line for line with the image list: a str, or a skip reason with its detail.
    texts: list[str | tuple[str, str]] = []
    if text_mode == "alltags":
        for i, line in enumerate(tree.iter_lines(ALL_TAGS)):
            s = decode_utf8(line)
            if s is None:
                texts.append(("text_not_utf8", f"{ALL_TAGS} line {i + 1}"))
                continue
            toks = s.split()
            if not toks:
                texts.append("")
                continue
            if not toks[0].isdigit():
                texts.append(("tags_malformed", f"{ALL_TAGS} line {i + 1} does not start with a photo id"))
                continue
            pid = photo_ids[i] if i < n else None
            if pid is not None and int(toks[0]) != pid:
                texts.append(("tags_misaligned", f"{ALL_TAGS} line {i + 1} is photo {toks[0]}, the image is photo {pid}"))
                continue
            texts.append(" ".join(toks[1:]))
        src_name = ALL_TAGS
    else:
        vocab = [t for line in tree.read_lines(TAGLIST_1K) if (t := (decode_utf8(line) or "").strip())]
        for i, line in enumerate(tree.iter_lines(ALLTAGS_1K)):
            cols = _parse_01_row(line, len(vocab))
            if cols is None:
                texts.append(("tags_malformed", f"{ALLTAGS_1K} line {i + 1}: not {len(vocab)} 0/1 values"))
                continue
            texts.append(" ".join(vocab[j] for j in cols))
        src_name = ALLTAGS_1K
    while len(texts) > n and texts[-1] == "":
        texts.pop()  # trailing blank lines
    if len(texts) != n:
        raise ValueError(
            f"{tree.display(src_name)} has {len(texts)} lines but {IMAGE_LIST} has {n}: the tag file must "
            "line up with the image list, line for line"
        )

    # Rows share few distinct label sets: key them by a bit mask instead of a per-row nonzero().
    masks = label_matrix.astype(np.int64) @ (np.int64(1) << np.arange(k, dtype=np.int64)) if n else []
    label_sets: dict[int, tuple[int, ...]] = {}
    candidates: list[Candidate] = []
    for i in range(n):
        rel = rels[i]
        src = f"{IMAGE_LIST}:{i + 1} {rel}"
        if not rel:
            report.add("image_path_empty", i, src, f"{IMAGE_LIST} line {i + 1} is empty")
            continue
        if path_under(image_root, rel) is None:
            raise ValueError(
                f"{tree.display(IMAGE_LIST)} line {i + 1}: image path {rel!r} is outside the image folder "
                f"{image_root} (a '..' component): a broken or hostile list"
            )
        if malformed[i]:
            files = ", ".join(f"Labels_{c}.txt" for c, bad in bad_in_top.items() if bad[i])
            report.add("label_row_malformed", i, src, f"line {i + 1} of {files} is not 0 or 1")
            continue
        t = texts[i]
        if isinstance(t, tuple):
            report.add(t[0], i, src, t[1])
            continue
        lab = label_sets.get(int(masks[i]))
        if lab is None:
            lab = label_sets[int(masks[i])] = tuple(int(j) for j in np.flatnonzero(label_matrix[i]))
        if not lab:
            report.add("no_label", i, src, f"none of the top-{k} concepts")
            continue
        if not t:
            report.add("empty_text", i, src, f"no tags in {src_name}")
            continue
        candidates.append(Candidate(id=i, image=rel, rows=(Row(i, lab, t),), source=rel))

    return SourceScan(
        layout=NAME,
        class_names=tuple(top),
        candidates=candidates,
        items_seen=n,
        image_root=image_root,
        description=(
            f"NUS-WIDE: the {k} most frequent of {len(concepts)} concepts (alphabetical order); pairs with "
            f">= 1 of them and non-empty tags; text = {'Flickr tags (All_Tags.txt)' if text_mode == 'alltags' else 'tags of the 1k vocabulary'}"
        ),
        details={"top_k": k, "text": text_mode, "concept_counts": {c: counts[c] for c in top}},
    )
