"""OpenAI CLIP checkpoints -> transformers towers, checked against a reference OpenAI forward."""

from __future__ import annotations

import copy
import logging
import os
import pickle
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dcgh_dist.models.clip_weights import (  # noqa: E402
    load_clip_towers,
    load_openai_state_dict,
    openai_to_hf,
)
from dcgh_dist.data.tokenizer import ClipTokenizer  # noqa: E402

# Small but structurally complete: several heads per tower (width // 64), different widths so a
# vision/text mix-up cannot go unnoticed, the real 49,408-token vocabulary.
IMAGE, PATCH, VISION_WIDTH, VISION_LAYERS = 32, 8, 192, 2
CONTEXT, TEXT_WIDTH, TEXT_LAYERS, VOCAB, EMBED = 16, 128, 2, 49408, 48
ATOL = 1e-5


# ------------------------------------------------------------------------------------------------
# A minimal re-implementation of OpenAI's CLIP ViT (same module names, hence same state-dict keys)
# ------------------------------------------------------------------------------------------------


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, attn_mask: torch.Tensor | None = None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, width * 4)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(width * 4, width)),
                ]
            )
        )
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = attn_mask  # a plain attribute in OpenAI's code: not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (seq, batch, width)
        mask = None if self.attn_mask is None else self.attn_mask.to(x.dtype)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, resolution: int, patch: int, width: int, layers: int, heads: int, out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn((resolution // patch) ** 2 + 1, width)
        )
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (N, width, grid, grid)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (N, grid², width)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class OpenAIClip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.context_length = CONTEXT
        self.visual = VisionTransformer(
            IMAGE, PATCH, VISION_WIDTH, VISION_LAYERS, VISION_WIDTH // 64, EMBED
        )
        self.transformer = Transformer(
            TEXT_WIDTH, TEXT_LAYERS, TEXT_WIDTH // 64, self.build_attention_mask()
        )
        self.vocab_size = VOCAB
        self.token_embedding = nn.Embedding(VOCAB, TEXT_WIDTH)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(CONTEXT, TEXT_WIDTH))
        self.ln_final = nn.LayerNorm(TEXT_WIDTH)
        self.text_projection = nn.Parameter(TEXT_WIDTH**-0.5 * torch.randn(TEXT_WIDTH, EMBED))
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))

    def build_attention_mask(self) -> torch.Tensor:
        return torch.empty(CONTEXT, CONTEXT).fill_(float("-inf")).triu_(1)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(text) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        # Features at the end token, which has the highest id in each sequence.
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        return self.encode_image(image), self.encode_text(text)


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> OpenAIClip:
    torch.manual_seed(0)
    model = OpenAIClip().eval()
    with torch.no_grad():
        # Perturb everything (LayerNorm gains/biases and attention biases start at 1/0), so a
        # mis-mapped tensor always changes the outputs.
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def openai_pt(reference: OpenAIClip, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("openai") / "ViT-tiny.pt"
    torch.save(reference.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    images = torch.randn(3, 3, IMAGE, IMAGE)
    tok = ClipTokenizer(CONTEXT, cache_dir=str(tmp_path_factory.mktemp("bpe")))
    texts = ["a photo of a cat", "", "A dog running on the beach " * 5, "Hello, World!"]
    ids = torch.from_numpy(tok(texts))
    assert ids[2, -1] == 49407 and ids[1, :3].tolist() == [49406, 49407, 0]
    return images, ids


def _check_towers(vision, text, reference: OpenAIClip, inputs) -> None:
    images, ids = inputs
    with torch.no_grad():
        np.testing.assert_allclose(
            vision(pixel_values=images).image_embeds.numpy(),
            reference.encode_image(images).numpy(),
            atol=ATOL,
            rtol=1e-4,
        )
        np.testing.assert_allclose(
            text(input_ids=ids).text_embeds.numpy(),
            reference.encode_text(ids).numpy(),
            atol=ATOL,
            rtol=1e-4,
        )


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_reference_has_openai_keys(reference: OpenAIClip) -> None:
    keys = set(reference.state_dict())
    assert {
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.transformer.resblocks.0.attn.in_proj_weight",
        "visual.proj",
        "transformer.resblocks.1.mlp.c_proj.bias",
        "text_projection",
        "logit_scale",
    } <= keys
    assert not any("attn_mask" in k for k in keys)


def test_config_is_inferred(reference: OpenAIClip) -> None:
    config, state = openai_to_hf(reference.state_dict())
    v, t = config.vision_config, config.text_config
    assert (v.image_size, v.patch_size, v.hidden_size) == (IMAGE, PATCH, VISION_WIDTH)
    assert (v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (2, 3, 768)
    assert (t.vocab_size, t.max_position_embeddings, t.hidden_size) == (VOCAB, CONTEXT, TEXT_WIDTH)
    assert (t.num_hidden_layers, t.num_attention_heads) == (2, 2)
    assert config.projection_dim == v.projection_dim == t.projection_dim == EMBED
    assert v.hidden_act == t.hidden_act == "quick_gelu"
    assert t.eos_token_id == 49407 and t.bos_token_id == 49406
    assert state["visual_projection.weight"].shape == (EMBED, VISION_WIDTH)
    assert state["text_projection.weight"].shape == (EMBED, TEXT_WIDTH)
    assert float(state["logit_scale"]) == pytest.approx(reference.logit_scale.item())
    assert all(v.dtype == torch.float32 for v in state.values())


def test_openai_pt_matches_reference(reference, openai_pt, inputs) -> None:
    vision, text = load_clip_towers(openai_pt)
    assert not vision.training and not text.training
    assert vision.config.projection_dim == text.config.projection_dim == EMBED
    _check_towers(vision, text, reference, inputs)


def test_fp16_checkpoint_is_upcast(reference, tmp_path, inputs) -> None:
    # OpenAI's released weights are fp16: the towers come back in float32.
    half = {k: v.half() for k, v in reference.state_dict().items()}
    torch.save(half, tmp_path / "half.pt")
    vision, text = load_clip_towers(tmp_path / "half.pt")
    assert next(vision.parameters()).dtype == torch.float32
    rounded = OpenAIClip().eval()
    rounded.load_state_dict({k: v.float() for k, v in half.items()})
    _check_towers(vision, text, rounded, inputs)


def test_nested_and_prefixed_state_dicts(reference, tmp_path) -> None:
    ref = reference.state_dict()
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in ref.items()}}
    torch.save(wrapped, tmp_path / "ddp.pt")
    torch.save({"model": ref}, tmp_path / "model.pt")
    for name in ("ddp.pt", "model.pt"):
        loaded = load_openai_state_dict(tmp_path / name)
        assert set(loaded) == set(ref)
        assert all(torch.equal(loaded[k], ref[k]) for k in ref)


def test_torchscript_archive_is_read_without_running_it(
    reference, tmp_path, inputs, caplog
) -> None:
    # OpenAI distributes fp16 TorchScript archives whose state dict also carries three metadata
    # entries; make one the same way (trace, half, jit.save).
    images, ids = inputs
    model = copy.deepcopy(reference)
    metadata = {"input_resolution": IMAGE, "context_length": CONTEXT, "vocab_size": VOCAB}
    for name, value in metadata.items():
        model.__dict__.pop(name, None)  # a plain int attribute in OpenAI's public code
        model.register_buffer(name, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (images, ids))
    traced.half()
    path = tmp_path / "jit.pt"
    torch.jit.save(traced, str(path))
    with zipfile.ZipFile(path) as zf:
        assert any(n.endswith("/constants.pkl") for n in zf.namelist())

    loaded = load_openai_state_dict(path)
    expected = traced.state_dict()  # what torch.jit.load(...).state_dict() would give
    assert set(loaded) == set(expected)  # exactly parameters + buffers: no attn_mask, no constants
    assert {"input_resolution", "context_length", "vocab_size"} <= set(loaded)
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
        assert not loaded[key].requires_grad

    rounded = OpenAIClip().eval()
    weights = reference.state_dict()
    rounded.load_state_dict({k: expected[k].float() for k in weights})
    with caplog.at_level(logging.WARNING, logger="dcgh_dist"):
        vision, text = load_clip_towers(path)
    assert not caplog.records  # metadata entries are dropped silently, as OpenAI's build_model does
    _check_towers(vision, text, rounded, inputs)


class _Payload:
    """Pickles as a call to os.makedirs: harmless, but visible if it ever runs."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_pickled_objects_are_refused(tmp_path) -> None:
    marker = tmp_path / "payload-ran"
    torch.save({"weight": torch.zeros(2), "evil": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="pickled Python objects.*os.makedirs"):
        load_openai_state_dict(tmp_path / "evil.pt")
    with pytest.raises(ValueError):
        load_clip_towers(tmp_path / "evil.pt")
    assert not marker.exists()


def test_malicious_torchscript_archive_is_refused(tmp_path) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil_jit.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(_Payload(marker), protocol=2))
        zf.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        zf.writestr("archive/version", "3\n")
    with pytest.raises(ValueError, match="refusing"):
        load_openai_state_dict(path)
    assert not marker.exists()


def test_hf_directory_round_trip(reference, tmp_path, inputs) -> None:
    from transformers import CLIPModel

    config, state = openai_to_hf(reference.state_dict())
    model = CLIPModel(config)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()

    vision, text = load_clip_towers(tmp_path / "hf")
    assert vision.config.projection_dim == text.config.projection_dim == EMBED
    _check_towers(vision, text, reference, inputs)
    # Legacy hub configs (openai/clip-vit-*) carry eos_token_id=2, which makes transformers pool
    # at argmax(ids): for zero-padded OpenAI ids that is the same end-token position.
    model.config.text_config.eos_token_id = 2
    model.save_pretrained(tmp_path / "legacy")
    vision, text = load_clip_towers(tmp_path / "legacy")
    assert text.config.eos_token_id == 2
    _check_towers(vision, text, reference, inputs)


def test_incomplete_hf_directory_is_refused(reference, tmp_path) -> None:
    from transformers import CLIPVisionModelWithProjection

    config, _ = openai_to_hf(reference.state_dict())
    CLIPVisionModelWithProjection(config.vision_config).save_pretrained(tmp_path / "vision")
    with pytest.raises(ValueError, match="full CLIP"):
        load_clip_towers(tmp_path / "vision")


def test_bad_paths_give_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip_towers(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):
        load_openai_state_dict(tmp_path / "nope.pt")

    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_clip_towers(junk)

    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_clip_towers(tmp_path / "empty_dir")

    from transformers import CLIPConfig

    CLIPConfig().save_pretrained(tmp_path / "config_only")  # config.json but no weights
    with pytest.raises(ValueError, match="cannot load a CLIP model"):
        load_clip_towers(tmp_path / "config_only")

    other = tmp_path / "other.pt"
    torch.save(nn.Linear(4, 2).state_dict(), other)
    with pytest.raises(ValueError, match="not an OpenAI CLIP ViT state dict"):
        load_clip_towers(other)


def test_hf_layout_state_dict_is_pointed_to_directory(reference) -> None:
    _, state = openai_to_hf(reference.state_dict())
    with pytest.raises(ValueError, match="Hugging Face layout"):
        openai_to_hf(state)
