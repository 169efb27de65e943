"""Row -> tensor preprocessing: decode + resize + normalise images, tokenize text, multi-hot labels.

``BatchPreprocessor`` is a plain callable on a batch dict of numpy arrays, so the same code runs in
a unit test, in a DataLoader and as a Ray Data ``map_batches`` CPU task (where it is pickled to the
worker processes, separate from the training workers). Images are handled with PIL and numpy
only: torchvision is kept out of the CPU install (see pyproject.toml).
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from dcgh_dist.data.format import DatasetError, DatasetInfo

logger = logging.getLogger(__name__)

# OpenAI CLIP's normalisation constants (the pretrained towers expect them).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def decode_image(data: bytes, where: str = "") -> Image.Image:
    """Encoded bytes -> RGB PIL image, or a DatasetError saying where the bad image is."""
    if data is None or len(data) == 0:
        raise DatasetError(f"{where}: column 'image' is empty")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # force full decode: truncated files fail here, not later
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        # a bomb (a small file claiming a huge size) is a bad row like any other: skipped, counted
        raise DatasetError(f"{where}: column 'image' cannot be decoded ({e})") from e
    return img.convert("RGB")


def image_to_array(
    img: Image.Image, size: int, *, augment: bool = False, rng: np.random.Generator | None = None
) -> np.ndarray:
    """CLIP-style transform -> float32 (3, size, size), normalised.

    Eval: resize the short side to ``size`` (bicubic) and centre-crop, like CLIP's preprocess.
    Train (``augment``): random crop of 70-100% of the short side at a random position, and a
    horizontal flip half the time, then resize.
    """
    w, h = img.size
    if augment:
        rng = rng or np.random.default_rng()
        side = int(min(w, h) * rng.uniform(0.7, 1.0))
        left = int(rng.integers(0, w - side + 1))
        top = int(rng.integers(0, h - side + 1))
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
    else:
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class BatchPreprocessor:
    """Turns a batch of dataset rows into model inputs.

    Output keys: ``id`` (int64), ``labels`` (float32 multi-hot, (N, C)), and per modality either
    ``image`` (float32 (N, 3, S, S)) / ``text`` (int64 token ids (N, L)) or ``image_features`` /
    ``text_features`` (float32). A ``path`` column (Ray Data ``include_paths=True``) is used to say
    which file a bad row came from.

    ``on_error``: ``"raise"`` (default, training) stops at the first bad payload with a
    ``DatasetError``. ``"skip"`` (encoding) keeps every row in the batch and adds, per modality, an
    ``image_error`` / ``text_error`` column of strings: ``""`` for a good row, else the message
    saying where and why (undecodable or empty image, empty text, features of the wrong length).
    A bad row's model input is zero-filled and must not be encoded; the consumer counts and
    reports it, so no row ever disappears silently. Label errors always raise (the dataset itself
    is malformed). ``with_labels=False`` skips the ``labels`` column (plain Parquet inputs to
    encoding have none).
    """

    def __init__(
        self,
        info: DatasetInfo,
        *,
        image_size: int = 224,
        context_length: int = 32,
        augment: bool = False,
        tokenizer_dir: str | None = None,
        modalities: tuple[str, ...] = ("image", "text"),
        on_error: str = "raise",
        with_labels: bool = True,
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.with_labels = with_labels
        self.info = info
        self.image_size = image_size
        self.context_length = context_length
        self.augment = augment
        self.tokenizer_dir = tokenizer_dir
        self.modalities = modalities
        self._tokenizer = None  # built lazily in the worker process

    def _tokenize(self, texts: list[str]) -> np.ndarray:
        if self._tokenizer is None:
            from dcgh_dist.data.tokenizer import ClipTokenizer

            self._tokenizer = ClipTokenizer(self.context_length, self.tokenizer_dir)
        return self._tokenizer(texts)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tokenizer"] = None
        return state

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["id"], dtype=np.int64)
        paths = batch.get("path")
        n = len(ids)
        skip = self.on_error == "skip"

        def where(i: int) -> str:
            file = str(paths[i]) if paths is not None else "batch"
            return f"{file}: row id {ids[i]}"

        out: dict[str, np.ndarray] = {"id": ids}
        if self.with_labels:
            labels = np.zeros((n, self.info.num_classes), dtype=np.float32)
            for i, row in enumerate(batch["labels"]):
                row = np.asarray(row, dtype=np.int64)
                if row.size == 0:
                    raise DatasetError(f"{where(i)}: column 'labels' is empty")
                if row.min() < 0 or row.max() >= self.info.num_classes:
                    raise DatasetError(
                        f"{where(i)}: column 'labels' has {row.tolist()}, outside 0..{self.info.num_classes - 1}"
                    )
                labels[i, row] = 1.0
            out["labels"] = labels

        if "image" in self.modalities:
            col = self.info.image_column
            errors = [""] * n
            if col == "image":
                rng = np.random.default_rng() if self.augment else None
                imgs = np.zeros((n, 3, self.image_size, self.image_size), dtype=np.float32)
                for i, data in enumerate(batch["image"]):
                    try:
                        img = decode_image(data, where(i))
                    except DatasetError as e:
                        if not skip:
                            raise
                        errors[i] = str(e)
                        continue
                    imgs[i] = image_to_array(img, self.image_size, augment=self.augment, rng=rng)
                out["image"] = imgs
            else:
                out["image_features"] = _stack_features(
                    batch[col], col, where, errors if skip else None, self.info.image_feature_dim
                )
            if skip:
                out["image_error"] = np.array(errors, dtype=object)

        if "text" in self.modalities:
            col = self.info.text_column
            errors = [""] * n
            if col == "text":
                texts = [("" if t is None else str(t)) for t in batch["text"]]
                for i, t in enumerate(texts):
                    if not t.strip():
                        if not skip:
                            raise DatasetError(f"{where(i)}: column 'text' is empty")
                        errors[i] = f"{where(i)}: column 'text' is empty"
                good = [i for i in range(n) if not errors[i]]
                tokens = self._tokenize([texts[i] for i in good]) if good else None
                if tokens is not None and len(good) == n:
                    out["text"] = tokens
                else:
                    full = np.zeros((n, self.context_length), dtype=np.int64)
                    if tokens is not None:
                        full[good] = tokens
                    out["text"] = full
            else:
                out["text_features"] = _stack_features(
                    batch[col], col, where, errors if skip else None, self.info.text_feature_dim
                )
            if skip:
                out["text_error"] = np.array(errors, dtype=object)
        return out


def _stack_features(values, col: str, where, errors: list[str] | None = None, dim: int | None = None) -> np.ndarray:
    """Feature lists -> float32 (N, D). ``errors`` given (skip mode): rows that are null or of
    the wrong length get a message there and a zero vector, instead of raising."""
    if errors is None:
        try:
            return np.stack([np.asarray(v, dtype=np.float32) for v in values])
        except ValueError as e:
            lens = [len(v) if v is not None else -1 for v in values]
            bad = next(i for i, L in enumerate(lens) if L != lens[0])
            raise DatasetError(f"{where(bad)}: column {col!r} has ragged length {lens[bad]} vs {lens[0]}") from e
    lens = [len(v) if v is not None else -1 for v in values]
    if dim is None:
        valid = [L for L in lens if L > 0]
        dim = max(set(valid), key=valid.count) if valid else 0
    out = np.zeros((len(lens), dim), dtype=np.float32)
    for i, (v, L) in enumerate(zip(values, lens)):
        if L != dim:
            errors[i] = f"{where(i)}: column {col!r} has length {L}, expected {dim}"
            continue
        out[i] = np.asarray(v, dtype=np.float32)
        if not np.isfinite(out[i]).all():
            errors[i] = f"{where(i)}: column {col!r} has NaN or infinite values"
            out[i] = 0.0
    return out
