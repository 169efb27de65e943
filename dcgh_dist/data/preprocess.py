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
    except (UnidentifiedImageError, OSError, ValueError) as e:
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
    ):
        self.info = info
        self.image_size = image_size
        self.context_length = context_length
        self.augment = augment
        self.tokenizer_dir = tokenizer_dir
        self.modalities = modalities
        self._tokenizer = None  # built lazily in the worker process

    def _tokenize(self, texts: list[str]) -> np.ndarray:
        if self._tokenizer is None:
            from dcgh_dist.models.tokenizer import ClipTokenizer

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

        def where(i: int) -> str:
            file = str(paths[i]) if paths is not None else "batch"
            return f"{file}: row id {ids[i]}"

        out: dict[str, np.ndarray] = {"id": ids}
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
            if col == "image":
                rng = np.random.default_rng() if self.augment else None
                imgs = np.empty((n, 3, self.image_size, self.image_size), dtype=np.float32)
                for i, data in enumerate(batch["image"]):
                    img = decode_image(data, where(i))
                    imgs[i] = image_to_array(img, self.image_size, augment=self.augment, rng=rng)
                out["image"] = imgs
            else:
                out["image_features"] = _stack_features(batch[col], col, where)

        if "text" in self.modalities:
            col = self.info.text_column
            if col == "text":
                texts = [("" if t is None else str(t)) for t in batch["text"]]
                for i, t in enumerate(texts):
                    if not t.strip():
                        raise DatasetError(f"{where(i)}: column 'text' is empty")
                out["text"] = self._tokenize(texts)
            else:
                out["text_features"] = _stack_features(batch[col], col, where)
        return out


def _stack_features(values, col: str, where) -> np.ndarray:
    try:
        return np.stack([np.asarray(v, dtype=np.float32) for v in values])
    except ValueError as e:
        lens = [len(v) if v is not None else -1 for v in values]
        bad = next(i for i, L in enumerate(lens) if L != lens[0])
        raise DatasetError(f"{where(bad)}: column {col!r} has ragged length {lens[bad]} vs {lens[0]}") from e
