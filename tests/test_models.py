"""The published CLIP presets (ViT-B/32, ViT-B/16) built with random weights: shapes, sizes, codes.

Nothing is downloaded: the towers are initialised from the preset's sizes. Each model (~150M
parameters) is built once per preset and run on a batch of two under ``torch.no_grad``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dcgh_dist import models  # noqa: E402
from dcgh_dist.config import ModelConfig  # noqa: E402
from dcgh_dist.models import CrossModalHasher, build_model, list_clip_presets  # noqa: E402
from dcgh_dist.data.tokenizer import ClipTokenizer  # noqa: E402

# The architectures OpenAI published (CLIP paper, Table 20; clip/model.py), written out here
# rather than read from the presets, so that a wrong preset cannot agree with itself.
PUBLISHED = {
    "vit-b-32": {"image_size": 224, "patch_size": 32},
    "vit-b-16": {"image_size": 224, "patch_size": 16},
}
VISION = {"width": 768, "layers": 12, "heads": 12}
TEXT = {"width": 512, "layers": 12, "heads": 8, "context": 77, "vocab": 49408}
EMBED = 512
# Parameter counts of OpenAI's released state dicts (without logit_scale), in millions: about
# 151.3M for ViT-B/32 and 149.6M for ViT-B/16.
PARAM_RANGE = {"vit-b-32": (151.0e6, 151.5e6), "vit-b-16": (149.4e6, 149.9e6)}

SOT, EOT = 49406, 49407


def _transformer_params(width: int, layers: int) -> int:
    # Per block: qkv in-projection (3w² + 3w), out-projection (w² + w), two LayerNorms (4w),
    # MLP w -> 4w -> w (8w² + 5w).
    return layers * (12 * width * width + 13 * width)


def openai_clip_params(image_size: int, patch_size: int) -> int:
    """Parameters of OpenAI's ViT CLIP (clip/model.py VisionTransformer + text transformer),
    without logit_scale, from the published sizes."""
    w, grid = VISION["width"], image_size // patch_size
    vision = (
        3 * patch_size * patch_size * w  # conv1, no bias
        + w  # class_embedding
        + (grid * grid + 1) * w  # positional_embedding
        + 2 * w  # ln_pre
        + _transformer_params(w, VISION["layers"])
        + 2 * w  # ln_post
        + w * EMBED  # proj
    )
    t = TEXT["width"]
    text = (
        TEXT["vocab"] * t  # token_embedding
        + TEXT["context"] * t  # positional_embedding
        + _transformer_params(t, TEXT["layers"])
        + 2 * t  # ln_final
        + t * EMBED  # text_projection
    )
    return vision + text


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class Built:
    preset: str
    model: CrossModalHasher
    images: torch.Tensor
    ids: torch.Tensor
    codes: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> ClipTokenizer:
    return ClipTokenizer(TEXT["context"], cache_dir=str(tmp_path_factory.mktemp("bpe")))


@pytest.fixture(scope="module", params=sorted(PUBLISHED))
def built(request: pytest.FixtureRequest, tokenizer: ClipTokenizer) -> Built:
    """One randomly initialised model per preset (through build_model), with one forward pass."""
    preset = request.param
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="clip", clip_preset=preset, bits=64)).eval()
    size = PUBLISHED[preset]["image_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    ids = torch.from_numpy(tokenizer(["a photo of a cat", "a dog running on the beach"]))
    with torch.no_grad():
        codes = model({"image": images, "text": ids})
    return Built(preset, model, images, ids, codes)


def test_published_presets_are_registered() -> None:
    assert set(PUBLISHED) <= set(list_clip_presets())
    assert ModelConfig().clip_preset == "vit-b-32"  # the DCGH authors' backbone is the default


def test_architecture_matches_published_clip(built: Built) -> None:
    patch, size = PUBLISHED[built.preset]["patch_size"], PUBLISHED[built.preset]["image_size"]
    vision = built.model.image_tower.model
    text = built.model.text_tower.model
    v, t = vision.config, text.config
    assert (v.image_size, v.patch_size) == (size, patch)
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads) == tuple(VISION.values())
    assert v.intermediate_size == 4 * VISION["width"]
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads) == (
        TEXT["width"], TEXT["layers"], TEXT["heads"])
    assert (t.max_position_embeddings, t.vocab_size) == (TEXT["context"], TEXT["vocab"])
    assert t.intermediate_size == 4 * TEXT["width"]
    assert v.projection_dim == t.projection_dim == EMBED
    assert v.hidden_act == t.hidden_act == "quick_gelu"  # OpenAI's QuickGELU, not exact GELU
    # The modules are what the configs say (not only the configs).
    emb = vision.vision_model.embeddings
    assert emb.patch_embedding.kernel_size == emb.patch_embedding.stride == (patch, patch)
    assert emb.position_embedding.weight.shape == ((size // patch) ** 2 + 1, VISION["width"])
    assert len(vision.vision_model.encoder.layers) == VISION["layers"]
    assert text.text_model.embeddings.token_embedding.weight.shape == (TEXT["vocab"], TEXT["width"])
    assert len(text.text_model.encoder.layers) == TEXT["layers"]
    # What the rest of the code reads off the towers.
    assert built.model.image_tower.image_size == size
    assert built.model.text_tower.max_positions == TEXT["context"]
    assert built.model.image_tower.out_dim == built.model.text_tower.out_dim == EMBED


def test_parameter_count(built: Built) -> None:
    size, patch = PUBLISHED[built.preset]["image_size"], PUBLISHED[built.preset]["patch_size"]
    towers = n_params(built.model.image_tower) + n_params(built.model.text_tower)
    assert towers == openai_clip_params(size, patch)
    low, high = PARAM_RANGE[built.preset]
    assert low < towers < high
    bits = built.model.bits
    assert n_params(built.model) == towers + 2 * (EMBED * bits + bits)  # two hash heads


def test_codes_of_a_forward_pass(built: Built) -> None:
    assert set(built.codes) == {"image_codes", "text_codes"}
    for name, codes in built.codes.items():
        assert codes.shape == (2, 64) and codes.dtype == torch.float32, name
        assert torch.isfinite(codes).all(), name
        assert (codes.abs() < 1).all(), name  # tanh: strictly inside (-1, 1)
        assert not torch.equal(codes[0], codes[1]), name  # the two inputs hash differently
    # The codes are tanh of a linear map of the tower's embedding (the random towers' codes lie
    # inside (-1, 1) even without tanh, so the bound above alone would not show it).
    model = built.model
    with torch.no_grad():
        embedding = model.image_tower(built.images)
        expected = torch.tanh(model.image_head.fc(embedding))
        # Each modality alone gives the same codes (encoding jobs hash one side at a time).
        alone = model({"text": built.ids})
    assert embedding.shape == (2, EMBED)
    torch.testing.assert_close(built.codes["image_codes"], expected)
    assert set(alone) == {"text_codes"}
    torch.testing.assert_close(alone["text_codes"], built.codes["text_codes"])


def test_text_tower_pools_at_the_end_token(built: Built) -> None:
    ids = built.ids.clone()
    assert ids.shape == (2, TEXT["context"])
    assert ids[:, 0].tolist() == [SOT, SOT]
    eot = (ids == EOT).int().argmax(dim=1)
    # Anything after the end token (the padding) cannot change the text embedding: causal mask
    # and pooling at the end token. A token before it does.
    after = ids.clone()
    after[0, eot[0] + 1:] = 320
    before = ids.clone()
    before[0, 1] = 1929
    tower = built.model.text_tower
    with torch.no_grad():
        ref, pad, word = tower(ids), tower(after), tower(before)
    assert ref.shape == (2, EMBED)
    torch.testing.assert_close(pad, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(word[0], ref[0], atol=1e-4)
    torch.testing.assert_close(word[1], ref[1], rtol=1e-5, atol=1e-5)  # rows are independent


@pytest.mark.parametrize("bits", [16, 128])
def test_code_width_follows_config(built: Built, bits: int, monkeypatch) -> None:
    # build_model with another width, reusing this preset's towers (rebuilding ~150M random
    # parameters per width would cost seconds and prove nothing more).
    requests = []

    def towers(preset, image_size=None):
        requests.append((preset, image_size))
        return built.model.image_tower, built.model.text_tower

    monkeypatch.setattr(models, "build_clip_towers", towers)
    model = build_model(ModelConfig(family="clip", clip_preset=built.preset, bits=bits)).eval()
    assert requests == [(built.preset, None)]
    assert model.bits == bits
    with torch.no_grad():
        codes = model({"image": built.images, "text": built.ids})
    for name, c in codes.items():
        assert c.shape == (2, bits), name
        assert (c.abs() < 1).all() and np.unique(c.numpy()).size > bits, name
