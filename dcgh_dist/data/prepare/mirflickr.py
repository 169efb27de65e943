"""MIRFLICKR-25K from the original distribution.

Expected under ROOT::

    mirflickr/im1.jpg ... im25000.jpg
    mirflickr/meta/tags/tags1.txt ...        one tag a line (the "clean" tags)
    mirflickr25k_annotations_v080/animals.txt ...   image numbers, one a line

Labels are the **24 plain concepts** of the v080 annotations (``animals`` ... ``water``, in
alphabetical order, as in DCMH and the CLIP-hashing codebases that follow it). The 14 ``*_r1.txt``
files are the "relevant" subsets of some of these concepts (images where the concept is salient):
every ``*_r1`` image is already in the plain file, so they add no labels and are not used.

Image numbers come from the file names (``im01.jpg`` is image 1); two files for one number
(``im01.jpg`` and ``im1.jpg``, or two tag files) stop the job with both names.

The usual protocol keeps the images with at least one label and at least one tag from the
vocabulary of tags that occur in at least 20 images (1,386 tags; 20,015 pairs). The text of a row
is the image's vocabulary tags in file order, deduplicated, joined by spaces.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

from dcgh_dist.data.prepare.base import Candidate, LayoutOptions, Row, SourceScan
from dcgh_dist.data.prepare.report import SkipReport
from dcgh_dist.data.prepare.source import InputTree, decode_utf8, require_dir

logger = logging.getLogger(__name__)

NAME = "mirflickr"
IMAGES_DIR = "mirflickr"
TAGS_DIR = "mirflickr/meta/tags"
ANNOTATIONS_DIR = "mirflickr25k_annotations_v080"
CONCEPTS = (
    "animals", "baby", "bird", "car", "clouds", "dog", "female", "flower", "food", "indoor",
    "lake", "male", "night", "people", "plant_life", "portrait", "river", "sea", "sky",
    "structures", "sunset", "transport", "tree", "water",
)
_IMAGE_RE = re.compile(r"im(\d+)\.jpg")
_TAGS_RE = re.compile(r"tags(\d+)\.txt")


def detect(tree: InputTree) -> bool:
    return tree.is_dir(ANNOTATIONS_DIR) or tree.is_dir(TAGS_DIR)


def expected(tree: InputTree) -> str:
    return f"{tree.display(ANNOTATIONS_DIR)}/ and {tree.display(TAGS_DIR)}/ (raw MIRFLICKR-25K)"


def check(tree: InputTree) -> None:
    require_dir(tree, IMAGES_DIR, "the MIRFLICKR-25K image folder (im1.jpg ...)")
    require_dir(tree, TAGS_DIR, "the MIRFLICKR-25K tag files (tags1.txt ...)")
    require_dir(tree, ANNOTATIONS_DIR, "the MIRFLICKR-25K v080 annotations folder")
    present = {name for name, _ in tree.list_files(ANNOTATIONS_DIR)}
    for c in CONCEPTS:
        if f"{c}.txt" not in present:
            raise FileNotFoundError(
                f"expected the annotation file of concept {c!r} at {tree.display(f'{ANNOTATIONS_DIR}/{c}.txt')}, "
                "which does not exist (the 24 plain concepts of mirflickr25k_annotations_v080 are all needed)"
            )


def _numbered(tree: InputTree, rel: str, pattern: re.Pattern) -> dict[int, str]:
    """Image number -> file name of the files of ``rel`` that match ``pattern``. Two names for one
    number (``im01.jpg`` and ``im1.jpg``) are an error: which one is the image is anyone's guess."""
    found: dict[int, str] = {}
    for name, _ in tree.list_files(rel):
        if m := pattern.fullmatch(name):
            n = int(m.group(1))
            if n in found:
                raise ValueError(
                    f"{tree.display(f'{rel}/{found[n]}')} and {tree.display(f'{rel}/{name}')} are both for image "
                    f"number {n}: remove one of them"
                )
            found[n] = name
    return found


def scan(tree: InputTree, opts: LayoutOptions, report: SkipReport) -> SourceScan:
    check(tree)
    images = _numbered(tree, IMAGES_DIR, _IMAGE_RE)
    tag_files = _numbered(tree, TAGS_DIR, _TAGS_RE)

    # Labels: concept index -> image numbers.
    labels: dict[int, set[int]] = {}
    for ci, concept in enumerate(CONCEPTS):
        rel = f"{ANNOTATIONS_DIR}/{concept}.txt"
        for ln, raw in enumerate(tree.iter_lines(rel), start=1):
            s = raw.strip()
            if not s:
                continue
            if not s.isdigit():
                report.add("annotation_bad_line", None, f"{tree.display(rel)}:{ln}", f"line {s[:40]!r}")
                continue
            labels.setdefault(int(s), set()).add(ci)

    numbers = sorted(set(images) | set(tag_files))
    for n in sorted(set(labels) - set(numbers)):
        report.add("annotation_unknown_image", n, f"{ANNOTATIONS_DIR}/*.txt",
                   f"image number {n} is annotated but has neither im{n}.jpg nor tags{n}.txt")

    # Tags: read every tag file (threads: one GET each on S3), then the vocabulary.
    logger.info("reading %d MIRFLICKR tag files", len(tag_files))
    tagged = sorted(tag_files)
    blobs = tree.read_many([f"{TAGS_DIR}/{tag_files[n]}" for n in tagged])
    tags: dict[int, list[str]] = {}
    bad_tags: dict[int, str] = {}
    for n, blob in zip(tagged, blobs):
        if blob is None:
            bad_tags[n] = "tags_missing"
            continue
        text = decode_utf8(blob)
        if text is None:
            bad_tags[n] = "text_not_utf8"
            continue
        seen: dict[str, None] = {}
        for line in text.replace("\r", "").split("\n"):
            t = line.strip()
            if t:
                seen.setdefault(t, None)
        tags[n] = list(seen)
    df = Counter(t for ts in tags.values() for t in ts)
    vocab = {t for t, c in df.items() if c >= opts.min_tag_images}
    logger.info("MIRFLICKR tag vocabulary: %d tags in >= %d images", len(vocab), opts.min_tag_images)

    candidates: list[Candidate] = []
    for n in numbers:
        # The file's own name (im01.jpg is image 1): a missing image is reported as im{n}.jpg.
        src = f"{IMAGES_DIR}/{images.get(n, f'im{n}.jpg')}"
        if n not in tags:
            reason = bad_tags.get(n, "tags_missing")
            report.add(reason, n, src, f"{TAGS_DIR}/{tag_files.get(n, f'tags{n}.txt')} "
                       + ("is not UTF-8" if reason == "text_not_utf8" else "not found"))
            continue
        lab = tuple(sorted(labels.get(n, ())))
        if not lab:
            report.add("no_label", n, src, "in none of the 24 concept files")
            continue
        kept = [t for t in tags[n] if t in vocab]
        if not kept:
            report.add("no_frequent_tag", n, src, f"{len(tags[n])} tag(s), none in >= {opts.min_tag_images} images")
            continue
        candidates.append(Candidate(id=n, image=src, rows=(Row(n, lab, " ".join(kept)),), source=src))

    return SourceScan(
        layout=NAME,
        class_names=CONCEPTS,
        candidates=candidates,
        items_seen=len(numbers),
        image_root=tree.uri,
        description=(
            "MIRFLICKR-25K: 24 concepts of the v080 annotations (plain files, *_r1 unused); pairs "
            f"with >= 1 label and >= 1 of the {len(vocab)} tags in >= {opts.min_tag_images} images; "
            "text = the image's vocabulary tags joined by spaces"
        ),
        details={"tag_vocabulary": len(vocab), "min_tag_images": opts.min_tag_images,
                 "images_found": len(images), "tag_files_found": len(tag_files)},
    )
