"""Encoder towers: CLIP's ViT image tower and transformer text tower, or MLPs over features.

Every tower maps its input to a fixed-size embedding and exposes ``out_dim``. The hash heads sit on
top (``dcgh_dist.models.hasher``). Towers know nothing of Ray, DeepSpeed or the loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import Tensor, nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipPreset:
    """Sizes of a CLIP model (OpenAI naming in comments)."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    text_positions: int  # positional table size (context length ≤ this)
    embed_dim: int  # projection size: what the hash heads see
    vocab_size: int = 49408


# A small registry (timm-style): tests are parametrised over it.
CLIP_PRESETS: dict[str, ClipPreset] = {
    # Trains from scratch on a laptop CPU in minutes on the demo set (64-px images, 8-px patches).
    "tiny": ClipPreset(64, 8, 128, 3, 4, 128, 3, 4, 77, 128),
    # OpenAI ViT-B/32, the DCGH authors' backbone.
    "vit-b-32": ClipPreset(224, 32, 768, 12, 12, 512, 12, 8, 77, 512),
    "vit-b-16": ClipPreset(224, 16, 768, 12, 12, 512, 12, 8, 77, 512),
}


def list_clip_presets() -> list[str]:
    return sorted(CLIP_PRESETS)


class ClipImageTower(nn.Module):
    """Pixel values (N, 3, H, W), CLIP-normalised -> projected image embedding (N, D)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # transformers.CLIPVisionModelWithProjection
        self.out_dim = int(model.config.projection_dim)
        self.image_size = int(model.config.image_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values).image_embeds


class ClipTextTower(nn.Module):
    """Token ids (N, L), OpenAI layout (0-padded, EOT = highest id) -> projected text embedding."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # transformers.CLIPTextModelWithProjection
        self.out_dim = int(model.config.projection_dim)
        self.max_positions = int(model.config.max_position_embeddings)

    def forward(self, input_ids: Tensor) -> Tensor:
        # No padding mask, as in OpenAI CLIP: the causal mask already keeps the padding after EOT
        # from reaching the pooled EOT position.
        return self.model(input_ids=input_ids).text_embeds


def build_clip_towers(preset: str | ClipPreset, image_size: int | None = None):
    """Randomly initialised CLIP towers of a preset's size."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    if isinstance(preset, str):
        if preset not in CLIP_PRESETS:
            raise ValueError(f"unknown CLIP preset {preset!r}; choose from {list_clip_presets()}")
        p = CLIP_PRESETS[preset]
    else:
        p = preset
    vision_cfg = CLIPVisionConfig(
        hidden_size=p.vision_width,
        intermediate_size=4 * p.vision_width,
        num_hidden_layers=p.vision_layers,
        num_attention_heads=p.vision_heads,
        image_size=image_size or p.image_size,
        patch_size=p.patch_size,
        projection_dim=p.embed_dim,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text_cfg = CLIPTextConfig(
        vocab_size=p.vocab_size,
        hidden_size=p.text_width,
        intermediate_size=4 * p.text_width,
        num_hidden_layers=p.text_layers,
        num_attention_heads=p.text_heads,
        max_position_embeddings=p.text_positions,
        projection_dim=p.embed_dim,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        # Pool at the first EOT token (id 49407); padding is 0 as in OpenAI's tokenizer.
        eos_token_id=p.vocab_size - 1,
        bos_token_id=p.vocab_size - 2,
        pad_token_id=0,
    )
    return (
        ClipImageTower(CLIPVisionModelWithProjection(vision_cfg)),
        ClipTextTower(CLIPTextModelWithProjection(text_cfg)),
    )


def clip_towers_from_configs(vision: dict, text: dict):
    """Towers of an exact architecture (transformers config dicts), randomly initialised."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    return (
        ClipImageTower(CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))),
        ClipTextTower(CLIPTextModelWithProjection(CLIPTextConfig(**text))),
    )


class FeatureTower(nn.Module):
    """MLP over precomputed vectors (CLIP embeddings of a catalogue, bag-of-words tags, ...)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...] = (1024,), dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.LayerNorm(h), nn.GELU(), nn.Dropout(dropout)]
            d = h
        self.net = nn.Sequential(*layers) if layers else nn.Identity()
        self.out_dim = d
        self.in_dim = in_dim

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"feature tower expects {self.in_dim}-dim inputs, got {x.shape[-1]}")
        return self.net(x)


def freeze_(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


__all__ = [
    "CLIP_PRESETS",
    "ClipPreset",
    "ClipImageTower",
    "ClipTextTower",
    "FeatureTower",
    "build_clip_towers",
    "clip_towers_from_configs",
    "list_clip_presets",
    "freeze_",
]
