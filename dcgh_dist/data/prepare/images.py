"""The per-image work done in the worker processes: read, verify by decoding, optionally shrink.

Every image is decoded before it is written, so training never meets an image it cannot decode
(the training preprocessor fails the job on one: docs/DATASET_FORMAT.md). The original encoded
bytes are stored unchanged unless ``max_side`` is set and the image is larger, in which case it
is shrunk to fit (aspect ratio kept) and re-encoded as JPEG at a fixed quality; PIL's encoder is
deterministic, so re-runs still give identical bytes.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from PIL import Image, UnidentifiedImageError

from dcgh_dist.data.prepare.source import InputTree, is_missing_error

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageOptions:
    max_side: int | None = None  # shrink larger images to fit in max_side x max_side; None = keep
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.max_side is not None and self.max_side < 8:
            raise ValueError(f"--max-side must be >= 8 pixels (or unset to keep originals), got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")


class ImageResult(NamedTuple):
    status: str  # "ok" or a skip reason from report.REASONS
    data: bytes | None  # the bytes to store when ok
    detail: str  # why not, or "" when ok
    read_bytes: int  # bytes read from the input (for throughput figures)


def check_image(data: bytes, opts: ImageOptions) -> ImageResult:
    """Decode ``data`` fully; return the bytes to store, or the reason it cannot be used."""
    n = len(data)
    if n == 0:
        return ImageResult("image_undecodable", None, "file is empty (0 bytes)", 0)
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        shrink = opts.max_side is not None and max(w, h) > opts.max_side
        if img.format == "JPEG":
            # JPEG can decode at 1/2, 1/4 or 1/8 scale for a fraction of the cost, and the
            # entropy-coded data is still read to the end, so truncation is caught exactly as by
            # a full decode. Only verifying: the smallest scale. Shrinking: at least twice the
            # target size, as Image.thumbnail(reducing_gap=2) does, so quality does not suffer.
            if shrink:
                s = opts.max_side / max(w, h)
                img.draft("RGB", (2 * max(1, round(w * s)), 2 * max(1, round(h * s))))
            else:
                img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        img.load()
        # The training preprocessor converts to RGB; modes it cannot convert fail here, not there.
        rgb = img.convert("RGB")
    except UnidentifiedImageError:
        # (PIL's message names the BytesIO object's address: not worth a non-reproducible report)
        return ImageResult("image_undecodable", None, f"not a recognised image format ({n} bytes)", n)
    except EOFError as e:
        return ImageResult("image_truncated", None, f"unexpected end of file ({e})", n)
    except Exception as e:  # noqa: BLE001 - PIL's plugins raise many types for corrupt files
        reason = "image_truncated" if "truncated" in str(e).lower() else "image_undecodable"
        return ImageResult(reason, None, f"{type(e).__name__}: {e}", n)
    if not shrink:
        return ImageResult("ok", data, "", n)
    rgb.thumbnail((opts.max_side, opts.max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=opts.jpeg_quality, optimize=False, progressive=False)
    return ImageResult("ok", buf.getvalue(), "", n)


def load_image(tree: InputTree, rel: str, opts: ImageOptions) -> ImageResult:
    """Read ``rel`` from ``tree`` and check it; every failure becomes a reason, never an exception."""
    if not rel:
        return ImageResult("image_path_empty", None, "empty image path", 0)
    try:
        with tree.fs.open_input_stream(tree.path(rel)) as f:
            data = f.read()
    except OSError as e:
        if is_missing_error(e):
            return ImageResult("image_missing", None, f"{tree.display(rel)} not found", 0)
        return ImageResult("image_unreadable", None, f"{tree.display(rel)}: {e}", 0)
    return check_image(data, opts)


# ---------------------------------------------------------------------------------------------
# Worker-process side. Each worker opens its own filesystem (pyarrow's S3 client is not fork-safe
# and cannot be pickled usefully), once per image root, and keeps it.

_WORKER: dict = {"trees": {}}


def init_worker(s3_endpoint: str | None, opts: ImageOptions) -> None:
    """Pool initializer: what every task needs. The image root comes with the tasks, so the pool
    can be started (and its imports paid for) before the metadata says where the images are."""
    _WORKER["s3_endpoint"] = s3_endpoint
    _WORKER["opts"] = opts
    _WORKER["trees"] = {}


def warm_up() -> None:
    """A no-op task: submitting one per worker makes the pool start its processes now."""


def process_chunk(image_root: str, paths: Sequence[str]) -> list[ImageResult]:
    """One task: the images of a chunk of items, in order."""
    trees = _WORKER["trees"]
    tree = trees.get(image_root)
    if tree is None:
        tree = trees[image_root] = InputTree(image_root, _WORKER["s3_endpoint"])
    return [load_image(tree, p, _WORKER["opts"]) for p in paths]
