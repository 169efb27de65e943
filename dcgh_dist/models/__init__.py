"""Model construction from config. Models know nothing of Ray or DeepSpeed."""

from __future__ import annotations

import logging

from dcgh_dist.config import ModelConfig
from dcgh_dist.models.hasher import CrossModalHasher, HashHead
from dcgh_dist.models.towers import (
    CLIP_PRESETS,
    ClipImageTower,
    ClipTextTower,
    FeatureTower,
    build_clip_towers,
    clip_towers_from_configs,
    freeze_,
    list_clip_presets,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_PRESETS",
    "CrossModalHasher",
    "HashHead",
    "build_model",
    "list_clip_presets",
    "resolve_family",
]


def dataset_family(info) -> str:
    """The tower family a dataset's columns call for: feature vectors -> ``features``, encoded
    images and raw captions -> ``clip``. A dataset mixing the two has no family."""
    kinds = (info.image_column == "image_features", info.text_column == "text_features")
    if kinds == (True, True):
        return "features"
    if kinds == (False, False):
        return "clip"
    raise ValueError(
        f"dataset {info.name!r} has columns {info.image_column!r} and {info.text_column!r}: a model "
        "takes either both raw modalities (image, text) or both feature vectors "
        "(image_features, text_features); see docs/DATASET_FORMAT.md"
    )


def resolve_family(cfg: ModelConfig, info) -> ModelConfig:
    """``model.family`` resolved against the dataset: ``auto`` follows ``dataset.json``; an
    explicit family that cannot read the dataset's columns is an error naming what to set."""
    import dataclasses

    wanted = dataset_family(info)
    if cfg.family == "auto":
        return dataclasses.replace(cfg, family=wanted)
    if cfg.family != wanted:
        cols = f"{info.image_column!r} and {info.text_column!r}"
        raise ValueError(
            f"model.family={cfg.family} does not fit dataset {info.name!r}, whose dataset.json "
            f"declares columns {cols}: that needs model.family={wanted} (or leave model.family "
            "unset: 'auto' follows the dataset)"
        )
    return cfg


def build_model(
    cfg: ModelConfig,
    *,
    image_feature_dim: int | None = None,
    text_feature_dim: int | None = None,
    clip_architecture: dict | None = None,
) -> CrossModalHasher:
    """Build the hasher the config describes.

    For ``family="features"`` the input sizes come from the dataset (``dataset.json``).
    For ``family="clip"`` with ``pretrained`` set, the towers are loaded from a local Hugging Face
    CLIP directory or an OpenAI-format ``.pt`` file; the preset's sizes are then ignored.
    ``clip_architecture`` (``{"vision": ..., "text": ...}`` transformers config dicts, as saved in
    checkpoints) rebuilds an exact architecture with random weights. ``family="auto"`` follows
    the inputs given: feature sizes mean feature towers.
    """
    family = cfg.family
    if family == "auto":
        family = "features" if image_feature_dim and text_feature_dim else "clip"
    if family == "clip":
        if clip_architecture:
            image_tower, text_tower = clip_towers_from_configs(
                clip_architecture["vision"], clip_architecture["text"]
            )
        elif cfg.pretrained:
            from dcgh_dist.models.clip_weights import load_clip_towers

            vision, text = load_clip_towers(cfg.pretrained)
            image_tower, text_tower = ClipImageTower(vision), ClipTextTower(text)
            logger.info("loaded CLIP towers from %s", cfg.pretrained)
        else:
            image_tower, text_tower = build_clip_towers(cfg.clip_preset, cfg.image_size)
        if cfg.context_length > text_tower.max_positions:
            raise ValueError(
                f"model.context_length={cfg.context_length} exceeds the text tower's "
                f"{text_tower.max_positions} positions"
            )
        model = CrossModalHasher(image_tower, text_tower, cfg.bits, cfg.hash_dropout, extra_bits=cfg.extra_bits)
    elif family == "features":
        if not image_feature_dim or not text_feature_dim:
            raise ValueError(
                "model.family='features' needs a dataset with image_features and text_features "
                f"columns (got dims {image_feature_dim}, {text_feature_dim})"
            )
        model = CrossModalHasher(
            FeatureTower(image_feature_dim, cfg.feature_hidden, cfg.feature_dropout),
            FeatureTower(text_feature_dim, cfg.feature_hidden, cfg.feature_dropout),
            cfg.bits,
            cfg.hash_dropout,
            image_key="image_features",
            text_key="text_features",
            extra_bits=cfg.extra_bits,
        )
    else:
        raise ValueError(f"unknown model.family {cfg.family!r}")

    if cfg.freeze in ("towers", "image"):
        freeze_(model.image_tower)
    if cfg.freeze in ("towers", "text"):
        freeze_(model.text_tower)
    return model
