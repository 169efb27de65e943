"""MS-COCO (2017, or any release with the same file names) from the original distribution.

Expected under ROOT::

    annotations/captions_train2017.json   annotations/instances_train2017.json   train2017/*.jpg
    annotations/captions_val2017.json     annotations/instances_val2017.json     val2017/*.jpg

Every ``annotations/captions_<split>.json`` found is used, with its ``instances_<split>.json`` and
image folder ``<split>/``; train and val together are the 123,287 images of COCO 2017.

- Labels: the 80 categories, mapped to 0..79 in category-id order; an image's labels are the
  categories of its instance annotations (crowd regions included). Images with none are dropped
  (the usual protocol: 122,218 images remain).
- Text (``--coco-captions``): ``first`` (default) takes the image's caption with the smallest
  annotation id, so there is one row per image and split sizes count images, as in the paper;
  ``join`` joins all of its captions with spaces; ``all`` writes one row per caption with the
  image's labels (row id = image id x 100 + caption rank) and keeps all captions of an image in the
  same split (sizes still count images).
- Row ids are COCO image ids.
- An image's ``file_name`` must name a file under its ``<split>/`` folder (no ``..`` out of it,
  no absolute path elsewhere): one that does not stops the job.

The instances files are parsed whole with ``json`` (instances_train2017.json is ~450 MB, ~3 GB of
Python objects at the peak); only (image, category) pairs are kept once it is read. Images are
streamed as for every layout.
"""

from __future__ import annotations

import gc
import json
import logging

from dcgh_dist.data.prepare.base import Candidate, LayoutOptions, Row, SourceScan
from dcgh_dist.data.prepare.report import SkipReport
from dcgh_dist.data.prepare.source import InputTree, normalize_text, path_under, require_dir, require_file

logger = logging.getLogger(__name__)

NAME = "coco"
ANNOTATIONS = "annotations"
CAPTION_MODES = ("first", "join", "all")
MAX_CAPTIONS = 100  # row id = image id * 100 + caption rank in "all" mode

# The 80 COCO categories in category-id order (used to name the classes of a list-layout COCO).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


def _splits(tree: InputTree) -> list[str]:
    names = [n for n, _ in tree.list_files(ANNOTATIONS)]
    return sorted(n[len("captions_"):-len(".json")] for n in names if n.startswith("captions_") and n.endswith(".json"))


def detect(tree: InputTree) -> bool:
    return tree.is_dir(ANNOTATIONS) and bool(_splits(tree))


def expected(tree: InputTree) -> str:
    return f"{tree.display(ANNOTATIONS + '/captions_train2017.json')} (raw MS-COCO)"


def check(tree: InputTree) -> list[str]:
    require_dir(tree, ANNOTATIONS, "the COCO annotations folder")
    splits = _splits(tree)
    if not splits:
        raise FileNotFoundError(
            f"expected {tree.display(ANNOTATIONS + '/captions_train2017.json')} (or another "
            "captions_<split>.json), which does not exist"
        )
    for s in splits:
        require_file(tree, f"{ANNOTATIONS}/instances_{s}.json", f"the instance annotations of {s}")
        require_dir(tree, s, f"the {s} image folder")
    return splits


def _load_json(tree: InputTree, rel: str) -> dict:
    try:
        return json.loads(tree.read_bytes(rel))
    except json.JSONDecodeError as e:
        raise ValueError(f"{tree.display(rel)}: not valid JSON ({e}); a truncated download?") from e


def scan(tree: InputTree, opts: LayoutOptions, report: SkipReport) -> SourceScan:
    mode = opts.coco_captions
    if mode not in CAPTION_MODES:
        raise ValueError(f"--coco-captions must be one of {CAPTION_MODES}, got {mode!r}")
    splits = check(tree)

    images: dict[int, str] = {}  # image id -> path relative to ROOT
    captions: dict[int, list[tuple[int, str]]] = {}
    labels: dict[int, set[int]] = {}
    categories: list[tuple[int, str]] | None = None
    for s in splits:
        logger.info("reading COCO %s annotations", s)
        cap = _load_json(tree, f"{ANNOTATIONS}/captions_{s}.json")
        inst = _load_json(tree, f"{ANNOTATIONS}/instances_{s}.json")
        cats = sorted((int(c["id"]), str(c["name"])) for c in inst.get("categories", []))
        if categories is None:
            categories = cats
        elif cats != categories:
            raise ValueError(f"{tree.display(f'{ANNOTATIONS}/instances_{s}.json')}: categories differ from those of {splits[0]}")
        split_images: set[int] = set()
        listed = [(f"captions_{s}.json", im) for im in cap.get("images", [])]
        listed += [(f"instances_{s}.json", im) for im in inst.get("images", [])]
        for name, im in listed:
            iid = int(im["id"])
            rel = path_under(tree.display(s), str(im["file_name"]))
            if rel is None:
                raise ValueError(
                    f"{tree.display(f'{ANNOTATIONS}/{name}')}: image {iid} has file_name {im['file_name']!r}, "
                    f"outside the image folder {tree.display(s)}/: a broken or hostile annotation file"
                )
            path = f"{s}/{rel}"
            if iid in images and images[iid] != path:
                report.add("duplicate_image", iid, path, f"image id {iid} is also {images[iid]}")
                continue
            images.setdefault(iid, path)
            split_images.add(iid)
        for a in cap.get("annotations", []):
            iid = int(a["image_id"])
            if iid not in split_images:
                report.add("annotation_unknown_image", iid, f"{ANNOTATIONS}/captions_{s}.json",
                           f"caption {a.get('id')} names image {iid}, not in {s}")
                continue
            captions.setdefault(iid, []).append((int(a["id"]), str(a.get("caption", ""))))
        index = {cid: i for i, (cid, _) in enumerate(categories)}
        for a in inst.get("annotations", []):
            iid, cid = int(a["image_id"]), int(a["category_id"])
            if iid not in split_images:
                report.add("annotation_unknown_image", iid, f"{ANNOTATIONS}/instances_{s}.json",
                           f"annotation {a.get('id')} names image {iid}, not in {s}")
            elif cid not in index:
                report.add("annotation_unknown_category", iid, f"{ANNOTATIONS}/instances_{s}.json",
                           f"annotation {a.get('id')} has category {cid}")
            else:
                labels.setdefault(iid, set()).add(index[cid])
        del cap, inst
        gc.collect()  # the instance JSON is gigabytes of small objects: give it back now

    candidates: list[Candidate] = []
    for iid in sorted(images):
        path = images[iid]
        lab = tuple(sorted(labels.get(iid, ())))
        caps = [t for _, c in sorted(captions.get(iid, [])) if (t := normalize_text(c))]
        if not lab:
            report.add("no_label", iid, path, "no instance annotation")
            continue
        if not caps:
            report.add("empty_text", iid, path, "no (non-empty) caption")
            continue
        if mode == "first":
            rows = (Row(iid, lab, caps[0]),)
        elif mode == "join":
            rows = (Row(iid, lab, " ".join(caps)),)
        else:
            if len(caps) > MAX_CAPTIONS:
                raise ValueError(f"COCO image {iid} has {len(caps)} captions; 'all' mode supports {MAX_CAPTIONS}")
            rows = tuple(Row(iid * MAX_CAPTIONS + k, lab, c) for k, c in enumerate(caps))
        candidates.append(Candidate(id=iid, image=path, rows=rows, source=path))

    names = tuple(n for _, n in categories or [])
    return SourceScan(
        layout=NAME,
        class_names=names,
        candidates=candidates,
        items_seen=len(images),
        image_root=tree.uri,
        description=(
            f"MS-COCO ({', '.join(splits)}): {len(names)} categories in category-id order; images with "
            f">= 1 instance annotation; text = captions mode {mode!r}"
        ),
        details={"coco_splits": splits, "captions": mode, "category_ids": [c for c, _ in categories or []]},
    )
