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
]


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
    checkpoints) rebuilds an exact architecture with random weights.
    """
    if cfg.family == "clip":
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
        model = CrossModalHasher(image_tower, text_tower, cfg.bits, cfg.hash_dropout)
    elif cfg.family == "features":
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
        )
    else:
        raise ValueError(f"unknown model.family {cfg.family!r}")

    if cfg.freeze in ("towers", "image"):
        freeze_(model.image_tower)
    if cfg.freeze in ("towers", "text"):
        freeze_(model.text_tower)
    return model
