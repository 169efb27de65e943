"""The list layout of many CLIP-hashing codebases: three text files, line for line.

Expected in ROOT::

    all_imgs.txt     image paths, relative to the image root (--image-root, default ROOT)
    all_tags.txt     the text of each item (comma-separated tags for MIRFLICKR, captions for COCO)
    all_labels.txt   one row of 0/1 per item, space (or comma) separated
    class_names.txt  optional: one class name a line

Windows line endings and a UTF-8 BOM are accepted; backslashes in image paths are read as ``/``.
An image path must stay under the image root (``source.path_under``: no ``..`` out of it; an
absolute path, local or ``s3://``, must lie under it): one that does not stops the job, naming
the line, before any image is read.
The three files must have the same number of lines (trailing blank lines aside): if they do not,
no line can be trusted to belong to its image, and the job stops with the counts.

Row ids are the 0-based line numbers. Lines that name the same image (one line per caption, as in
some COCO lists) form one item: their rows share a split. Class names come from
``class_names.txt`` or ``--class-names``; else, for a preset with a known class list of the same
length (MIRFLICKR-25K's 24 concepts, COCO's 80 categories), from that list; else ``class_<i>``.
"""

from __future__ import annotations

import logging
from collections import Counter

from dcgh_dist.data.prepare.base import Candidate, LayoutOptions, Row, SourceScan
from dcgh_dist.data.prepare.report import SkipReport
from dcgh_dist.data.prepare.source import InputTree, decode_utf8, normalize_text, path_under, require_file

logger = logging.getLogger(__name__)

NAME = "list"
IMGS, TAGS, LABELS = "all_imgs.txt", "all_tags.txt", "all_labels.txt"
CLASS_NAME_FILES = ("class_names.txt", "classnames.txt")


def detect(tree: InputTree) -> bool:
    return tree.is_file(IMGS)


def expected(tree: InputTree) -> str:
    return f"{tree.display(IMGS)} (list layout: all_imgs.txt, all_tags.txt, all_labels.txt)"


def check(tree: InputTree) -> None:
    for rel, what in ((IMGS, "the image list"), (TAGS, "the text list"), (LABELS, "the label rows")):
        require_file(tree, rel, f"{what} of the list layout")


def _lines(tree: InputTree, rel: str) -> list[bytes]:
    lines = tree.read_lines(rel)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _label_row(line: bytes) -> list[int] | None:
    """0/1 values of a row ('1', '0', '1.0' ...), or None if a value is anything else."""
    toks = line.replace(b",", b" ").split()
    out = []
    for t in toks:
        try:
            v = float(t)
        except ValueError:
            return None
        if v not in (0.0, 1.0):
            return None
        out.append(int(v))
    return out


def _known_class_names(dataset: str, num_classes: int) -> tuple[str, ...] | None:
    from dcgh_dist.data.prepare import coco, mirflickr

    names = {"mirflickr25k": mirflickr.CONCEPTS, "coco": coco.COCO_CLASSES}.get(dataset)
    return tuple(names) if names and len(names) == num_classes else None


def _class_names(tree: InputTree, opts: LayoutOptions, num_classes: int) -> tuple[tuple[str, ...], str]:
    source = None
    if opts.class_names_file:
        parent, _, name = opts.class_names_file.rstrip("/").rpartition("/")
        names_tree, rel = (InputTree(parent or ".", opts.s3_endpoint), name)
        source = opts.class_names_file
    else:
        names_tree, rel = tree, next((f for f in CLASS_NAME_FILES if tree.is_file(f)), None)
        source = tree.display(rel) if rel else None
    if rel:
        names = tuple(n for line in names_tree.read_lines(rel) if (n := (decode_utf8(line) or "").strip()))
        if len(names) != num_classes:
            raise ValueError(f"{source} lists {len(names)} class names but {LABELS} has {num_classes} columns")
        return names, source
    known = _known_class_names(opts.dataset, num_classes)
    if known:
        logger.warning("no class_names.txt in %s: using the %s class list (%d names) in column order",
                       tree.uri, opts.dataset, num_classes)
        return known, f"the {opts.dataset} preset"
    return tuple(f"class_{i}" for i in range(num_classes)), "generic"


def scan(tree: InputTree, opts: LayoutOptions, report: SkipReport) -> SourceScan:
    check(tree)
    imgs, tags, labs = _lines(tree, IMGS), _lines(tree, TAGS), _lines(tree, LABELS)
    if not (len(imgs) == len(tags) == len(labs)):
        raise ValueError(
            f"{tree.uri}: {IMGS} has {len(imgs)} lines, {TAGS} {len(tags)}, {LABELS} {len(labs)}; they must "
            "line up, line for line (a truncated or mismatched file?)"
        )
    n = len(imgs)
    parsed = [_label_row(line) for line in labs]
    widths = Counter(len(r) for r in parsed if r is not None)
    if not widths:
        raise ValueError(f"{tree.display(LABELS)}: no row of 0/1 values")
    width = widths.most_common(1)[0][0]
    if opts.num_classes is not None and width != opts.num_classes:
        raise ValueError(
            f"{tree.display(LABELS)} has {width} columns but the {opts.dataset} preset has {opts.num_classes} "
            "classes (prepared for another class set?)"
        )
    class_names, names_from = _class_names(tree, opts, width)
    image_root = opts.image_root or tree.uri

    by_image: dict[str, list[Row]] = {}
    first_id: dict[str, int] = {}
    for i in range(n):
        path_s = decode_utf8(imgs[i])
        written = (path_s or "").strip().replace("\\", "/")
        src = f"{IMGS}:{i + 1} {written}"
        if path_s is None:
            report.add("text_not_utf8", i, f"{IMGS}:{i + 1}", "image path is not UTF-8")
            continue
        if not written:
            report.add("image_path_empty", i, src, f"{IMGS} line {i + 1} is empty")
            continue
        path = path_under(image_root, written)
        if path is None:
            # Not a row to skip: a list that points outside its images is broken or hostile.
            raise ValueError(
                f"{tree.display(IMGS)} line {i + 1}: image path {written!r} is outside the image root "
                f"{image_root}; paths in {IMGS} are relative to --image-root (or absolute under it) and "
                "may not leave it with '..'"
            )
        row = parsed[i]
        if row is None or len(row) != width:
            report.add("label_row_malformed", i, src,
                       f"{LABELS} line {i + 1}: {labs[i][:80].decode('utf-8', 'replace')!r} (expected {width} values of 0/1)")
            continue
        text_s = decode_utf8(tags[i])
        if text_s is None:
            report.add("text_not_utf8", i, src, f"{TAGS} line {i + 1} is not UTF-8")
            continue
        lab = tuple(j for j, v in enumerate(row) if v)
        if not lab:
            report.add("no_label", i, src, f"{LABELS} line {i + 1} is all zeros")
            continue
        text = normalize_text(text_s)
        if not text:
            report.add("empty_text", i, src, f"{TAGS} line {i + 1} is empty")
            continue
        by_image.setdefault(path, []).append(Row(i, lab, text))
        first_id.setdefault(path, i)

    candidates = sorted(
        (Candidate(id=first_id[p], image=p, rows=tuple(rows), source=p) for p, rows in by_image.items()),
        key=lambda c: c.id,
    )
    return SourceScan(
        layout=NAME,
        class_names=class_names,
        candidates=candidates,
        items_seen=n,
        image_root=image_root,
        description=f"{opts.dataset} from the list layout (all_imgs/all_tags/all_labels.txt); class names from {names_from}",
        details={"lines": n, "images": len(candidates), "class_names_from": names_from},
    )
