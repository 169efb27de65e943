"""What a model's inputs are: the one builder of the preprocessing (image size, normalisation,
tokenizer, context length) that training, evaluation, encoding and serving feed a model through.

It lives with the models, not with the data, because the image size and the tokenizer are the
model's: a CLIP size preset fixes its resolution, pretrained weights bring their own vocabulary.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from dcgh_dist.config import Config
from dcgh_dist.data.format import DatasetInfo
from dcgh_dist.data.preprocess import BatchPreprocessor
from dcgh_dist.models.towers import CLIP_PRESETS

DEFAULT_IMAGE_SIZE = 224


def image_size_for(cfg: Config, architecture: Mapping | None = None) -> int:
    """A checkpoint's recorded vision size, else the config's, else its CLIP preset's."""
    vision = (architecture or {}).get("vision") or {}
    if vision.get("image_size"):
        return int(vision["image_size"])
    if cfg.model.image_size:
        return cfg.model.image_size
    preset = CLIP_PRESETS.get(cfg.model.clip_preset)
    return preset.image_size if preset else DEFAULT_IMAGE_SIZE


def preprocessor_for(
    cfg: Config,
    info: DatasetInfo,
    *,
    architecture: Mapping | None = None,
    augment: bool = False,
    modalities: Sequence[str] = ("image", "text"),
    on_error: str = "raise",
    with_labels: bool = True,
) -> BatchPreprocessor:
    """The preprocessing of ``cfg``'s model over ``info``'s columns. ``architecture``: a
    checkpoint's recorded architecture, whose vision size wins over the config's."""
    pretrained = cfg.model.pretrained
    return BatchPreprocessor(
        info, image_size=image_size_for(cfg, architecture), context_length=cfg.model.context_length,
        augment=augment, tokenizer_dir=pretrained if pretrained and not str(pretrained).endswith(".pt") else None,
        modalities=tuple(modalities), on_error=on_error, with_labels=with_labels,
    )
