"""Pretrained CLIP weights: a local Hugging Face directory or an OpenAI-format ``.pt`` file.

The DCGH authors start from OpenAI's ``ViT-B-32.pt``. This module reads such files without
executing code from them and converts their tensors to the layout of transformers' ``CLIPModel``,
so the rest of the project only ever deals with ``CLIPVisionModelWithProjection`` /
``CLIPTextModelWithProjection``.

Safety. Checkpoints are untrusted input, and unpickling can run arbitrary code:

* plain ``torch.save`` files are read with ``torch.load(weights_only=True)``;
* OpenAI's released ``.pt`` files are TorchScript archives. ``torch.load`` refuses those with
  ``weights_only=True`` and ``torch.jit.load`` is documented as unsafe on untrusted data (loading
  runs TorchScript code and full unpickling). A TorchScript archive is however an ordinary zip
  file whose ``data.pkl`` describes the module tree with the same pickle opcodes and tensor
  records as ``torch.save``. We therefore read ``data.pkl`` with PyTorch's own restricted
  weights-only unpickler, allowing only the ``__torch__.*`` module classes named in the file
  (mapped to inert placeholder classes defined here) and tensor storages read straight from the
  zip. Parameter/buffer names per module class come from the ``__parameters__`` /
  ``__buffers__`` declarations in the archive's generated code, parsed as text (never executed).
  Nothing else in the archive (code, ``constants.pkl``, debug pickles) is unpickled.
"""

from __future__ import annotations

import ast
import copy
import io
import json
import logging
import os
import pickle
import pickletools
import re
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # transformers is imported lazily: it is slow to import
    import transformers

logger = logging.getLogger(__name__)

_CONVERT_HINT = (
    "If you trust the file, convert it once to a plain state dict where it is safe to do so: "
    "python -c \"import torch; m = torch.jit.load('ViT-B-32.pt', map_location='cpu'); "
    "torch.save(m.state_dict(), 'ViT-B-32.state_dict.pt')\" and pass the new file."
)

# Entries of OpenAI's JIT archives that are not weights (OpenAI's build_model drops them too).
_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_READ_CHUNK = 16 << 20
# Generated code of a whole CLIP is well under 1 MiB per file; larger declared sizes are skipped
# rather than decompressed (a zip bomb must not exhaust memory before any check runs).
_MAX_CODE_FILE = 64 << 20


# ------------------------------------------------------------------------------------------------
# Reading checkpoints
# ------------------------------------------------------------------------------------------------


class _TorchScriptObject:
    """Inert stand-in for a ``__torch__.*`` class while reading a TorchScript archive.

    The weights-only unpickler creates it with ``__new__`` and fills ``__dict__`` with the pickled
    attributes; it has no behaviour of its own.
    """

    ts_qualname = ""


def _identity_type_tag(value: Any, *_: Any) -> Any:
    # torch.jit._pickle.restore_type_tag(value, type_str) only re-attaches TorchScript type info.
    return value


def _identity(value: Any) -> Any:
    # torch.jit._pickle.build_{int,double,bool,tensor}list(list) -> that list.
    return value


_JIT_PICKLE_HELPERS = {
    "torch.jit._pickle.restore_type_tag": _identity_type_tag,
    "torch.jit._pickle.build_intlist": _identity,
    "torch.jit._pickle.build_doublelist": _identity,
    "torch.jit._pickle.build_boollist": _identity,
    "torch.jit._pickle.build_tensorlist": _identity,
}

_CLASS_HEADER = re.compile(r"^class\s+(\w+)\s*\(", re.M)
_DECLARATION = re.compile(r"^\s+(__parameters__|__buffers__)\s*=\s*(\[.*?\])\s*$", re.M)


def _torchscript_param_table(zf: zipfile.ZipFile, prefix: str) -> dict[str, list[str]]:
    """Map each TorchScript class to its parameter + buffer names, from the archive's code text.

    The generated code declares ``__parameters__ = ["weight", "bias", ]`` and ``__buffers__``
    for every module class; these lists are literals, read with ``ast.literal_eval``.
    """
    table: dict[str, list[str]] = {}
    code_root = prefix + "code/"
    for name in zf.namelist():
        if not (name.startswith(code_root) and name.endswith(".py")):
            continue
        if zf.getinfo(name).file_size > _MAX_CODE_FILE:
            logger.warning("skipping oversized TorchScript code record %s", name)
            continue
        module = name[len(code_root) : -len(".py")].replace("/", ".")
        text = zf.read(name).decode("utf-8", errors="replace")
        headers = list(_CLASS_HEADER.finditer(text))
        for i, header in enumerate(headers):
            end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
            body = text[header.end() : end]
            names: dict[str, list[str]] = {}
            for decl in _DECLARATION.finditer(body):
                if decl.group(1) in names:
                    continue  # only the class-level declaration counts
                try:
                    value = ast.literal_eval(decl.group(2))
                except (ValueError, SyntaxError):
                    continue
                if isinstance(value, list) and all(isinstance(v, str) for v in value):
                    names[decl.group(1)] = value
            if "__parameters__" in names:
                table[f"{module}.{header.group(1)}"] = names["__parameters__"] + names.get(
                    "__buffers__", []
                )
    return table


def _pickle_globals(data: bytes) -> set[str]:
    """Every ``module.name`` a pickle references, found by scanning opcodes (nothing executed)."""
    found: set[str] = set()
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name == "GLOBAL":
            module, name = str(arg).split(" ", 1)
            found.add(f"{module}.{name}")
        elif opcode.name == "STACK_GLOBAL":
            # TorchScript writes pickle protocol 2; STACK_GLOBAL (protocol 4) would need a full
            # stack simulation to name, so such files are not accepted here.
            raise ValueError("unexpected pickle protocol in TorchScript archive")
    return found


def _read_torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, read without running its code."""
    try:
        from torch import _weights_only_unpickler
    except ImportError as e:  # pragma: no cover - present in every supported torch
        raise ValueError(f"{path} is a TorchScript archive; {_CONVERT_HINT}") from e

    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        data_pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(data_pkls) != 1:
            raise ValueError(f"{path}: expected one <archive>/data.pkl record, got {data_pkls}")
        prefix = data_pkls[0][: -len("data.pkl")]
        if prefix + "byteorder" in names:
            order = zf.read(prefix + "byteorder").decode("ascii", errors="replace").strip()
            if order != sys.byteorder:
                raise ValueError(f"{path} was written {order}-endian; this machine is not")

        data = zf.read(data_pkls[0])
        try:
            referenced = _pickle_globals(data)
        except Exception as e:  # noqa: BLE001 - malformed pickle bytes
            raise ValueError(f"{path}: unreadable data.pkl in TorchScript archive: {e}") from e
        placeholders = {
            qualname: type(
                qualname.rsplit(".", 1)[-1],
                (_TorchScriptObject,),
                {"ts_qualname": qualname, "__module__": __name__},
            )
            for qualname in referenced
            if qualname.startswith("__torch__.")
        }
        allowed: list[Any] = [(cls, name) for name, cls in placeholders.items()]
        allowed += [(fn, name) for name, fn in _JIT_PICKLE_HELPERS.items() if name in referenced]

        storages: dict[str, Any] = {}

        def persistent_load(pid: Any) -> Any:
            # ('storage', storage_type, key, location, numel), as in torch.save archives.
            if not (isinstance(pid, tuple) and len(pid) == 5):
                raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
            _, storage_type, key, _location, numel = pid
            key = str(key)
            if key in storages:
                return storages[key]
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
            record = f"{prefix}data/{key}"
            if record not in names:
                raise pickle.UnpicklingError(f"missing tensor record {record}")
            nbytes = int(numel) * torch.empty((), dtype=dtype).element_size()
            if zf.getinfo(record).file_size != nbytes:
                raise pickle.UnpicklingError(f"tensor record {record} has the wrong size")
            buf = torch.empty(nbytes, dtype=torch.uint8)
            view = memoryview(buf.numpy())
            with zf.open(record) as f:
                pos = 0
                while pos < nbytes:
                    n = f.readinto(view[pos : min(nbytes, pos + _READ_CHUNK)])
                    if not n:
                        raise pickle.UnpicklingError(f"tensor record {record} is truncated")
                    pos += n
            storage = torch.storage.TypedStorage(
                wrap_storage=buf.untyped_storage(), dtype=dtype, _internal=True
            )
            storages[key] = storage
            return storage

        unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8")
        unpickler.persistent_load = persistent_load
        try:
            # safe_globals widens torch's process-wide allowlist for the duration of this load,
            # and only by the inert placeholder classes and identity helpers above.
            with torch.serialization.safe_globals(allowed):
                root = unpickler.load()
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{path} is a TorchScript archive holding objects other than modules and tensors; "
                f"refusing to load it ({e}). {_CONVERT_HINT}"
            ) from e
        except Exception as e:  # noqa: BLE001 - corrupt or unexpected archive layout
            raise ValueError(
                f"cannot read the weights of TorchScript archive {path}: {e}. {_CONVERT_HINT}"
            ) from e
        table = _torchscript_param_table(zf, prefix)

    if not isinstance(root, _TorchScriptObject):
        raise ValueError(f"{path}: TorchScript archive does not hold a module")
    state: dict[str, torch.Tensor] = {}
    _collect_tensors(root, "", table, state, set())
    if not state:
        raise ValueError(f"{path}: TorchScript archive holds no tensors")
    return state


def _collect_tensors(
    obj: _TorchScriptObject,
    prefix: str,
    table: Mapping[str, list[str]],
    out: dict[str, torch.Tensor],
    seen: set[int],
) -> None:
    """Depth-first ``state_dict()`` of a placeholder module tree."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    attrs = vars(obj)
    declared = table.get(type(obj).ts_qualname)
    if declared is None:
        # No declaration found (unusual archive): every tensor attribute is taken as a weight.
        declared = [k for k, v in attrs.items() if isinstance(v, torch.Tensor)]
    for name in declared:
        value = attrs.get(name)
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value.detach()
    for name, value in attrs.items():
        if isinstance(value, _TorchScriptObject):
            _collect_tensors(value, f"{prefix}{name}.", table, out, seen)


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        # torch.load's own test: a TorchScript archive has a constants.pkl record.
        return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in zf.namelist())


def _strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the ``module.`` prefixes DataParallel / DDP wrappers add to every key."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def _unwrap_checkpoint(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a loaded checkpoint (possibly nested under state_dict/model)."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        inner = next(
            (obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None
        )
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path} does not hold a state dict (got {type(obj).__name__}); save "
            "model.state_dict() rather than the model object"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    dropped = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if dropped:
        logger.info("%s: ignoring %d non-tensor entries: %s", path, len(dropped), dropped[:5])
    if not tensors:
        raise ValueError(f"{path} holds no tensors; is it a model checkpoint?")
    return tensors


def _unpickling_reason(error: Exception) -> str:
    """The informative line of torch's weights-only error (it wraps it in generic advice)."""
    boilerplate = (
        "Weights only load failed",
        "Please file",
        "Check the documentation",
        "Re-running",
    )
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    return (useful or lines or [type(error).__name__])[-1]


def load_openai_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read the tensors of an OpenAI-format CLIP checkpoint, without executing code from it.

    Accepts OpenAI's released TorchScript archives (``ViT-B-32.pt``), plain ``torch.save`` state
    dicts (also nested under ``"state_dict"`` or ``"model"``) and ``.safetensors`` files.
    ``module.`` prefixes are stripped. Tensors keep their stored dtype (OpenAI's are fp16).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"CLIP checkpoint {p} does not exist")
    if not p.is_file():
        raise ValueError(f"{p} is not a file; pass an OpenAI-format .pt file")

    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _strip_module_prefix(load_file(str(p), device="cpu"))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"cannot read safetensors file {p}: {e}") from e

    try:
        torchscript = _is_torchscript_archive(p)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read {p}: {e}") from e
    if torchscript:
        return _strip_module_prefix(_read_torchscript_state_dict(p))

    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(e)
        if "GLOBAL" in reason:
            raise ValueError(
                f"{p} contains pickled Python objects other than tensors and containers, which "
                f"are not loaded for safety (torch.load weights_only=True refused: {reason}). "
                "Save a plain state dict (torch.save(model.state_dict(), path)) instead."
            ) from e
        raise ValueError(
            f"{p} is not a readable PyTorch checkpoint ({reason}); pass an OpenAI-format .pt "
            "state dict or a Hugging Face CLIP directory"
        ) from e
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/EOFError/... on junk
        raise ValueError(f"{p} is not a readable PyTorch checkpoint: {e}") from e
    return _strip_module_prefix(_unwrap_checkpoint(obj, p))


# ------------------------------------------------------------------------------------------------
# OpenAI layout -> transformers layout
# ------------------------------------------------------------------------------------------------

_BLOCK_RENAMES = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_DIRECT_RENAMES = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_REQUIRED = (
    "visual.conv1.weight",
    "visual.class_embedding",
    "visual.positional_embedding",
    "visual.proj",
    "token_embedding.weight",
    "positional_embedding",
    "ln_final.weight",
    "text_projection",
)


def _count_layers(state: Mapping[str, torch.Tensor], tower_prefix: str) -> int:
    """Number of residual blocks, checked to be numbered 0..n-1 without gaps."""
    indices = {
        int(m.group(2))
        for k in state
        if (m := _RESBLOCK.match(k)) and (m.group(1) or "") == tower_prefix
    }
    if indices != set(range(len(indices))):
        raise ValueError(f"{tower_prefix or 'text '}transformer blocks are not numbered 0..n-1")
    return len(indices)


def _heads(width: int, tower: str) -> int:
    heads = width // 64  # OpenAI's rule for every released CLIP: 64-dim attention heads
    if heads < 1 or width % heads:
        raise ValueError(f"{tower} width {width} does not split into 64-dim attention heads")
    return heads


def openai_to_hf(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[transformers.CLIPConfig, dict[str, torch.Tensor]]:
    """Infer the architecture of an OpenAI CLIP ViT state dict and convert it to ``CLIPModel`` keys.

    Sizes are read off the tensors as OpenAI's ``build_model`` does: vision width / patch size
    from ``visual.conv1``, image resolution from the positional table, embedding size from
    ``text_projection``, context length / vocabulary / text width from the text tables, layer
    counts from the block indices, and ``width // 64`` attention heads per tower. Floating tensors
    are returned as float32 (OpenAI stores fp16).

    The text config sets ``eos_token_id = vocab_size - 1`` (OpenAI's end token, 49407), so the
    transformers text model pools at the first end token: for OpenAI-layout ids (zero-padded, end
    token present) that is exactly OpenAI's ``argmax(token ids)`` pooling.
    """
    from transformers import CLIPConfig

    sd = _strip_module_prefix(state_dict)
    if any(k.startswith(("vision_model.", "text_model.")) for k in sd):
        raise ValueError(
            "these weights are already in the Hugging Face layout; pass the Hugging Face model "
            "directory (with its config.json) instead"
        )
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in sd):
        raise ValueError(
            "this is an OpenAI ResNet CLIP (RN50/RN101/...); only ViT CLIP models are supported"
        )
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise ValueError(
            f"not an OpenAI CLIP ViT state dict: missing {missing} "
            f"(found {len(sd)} keys, e.g. {sorted(sd)[:5]})"
        )

    conv = sd["visual.conv1.weight"]
    vision_width, channels, patch_size = conv.shape[0], conv.shape[1], conv.shape[-1]
    if conv.shape[-1] != conv.shape[-2]:
        raise ValueError(f"non-square patches are not supported: conv1 {tuple(conv.shape)}")
    n_pos = sd["visual.positional_embedding"].shape[0]
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid + 1 != n_pos:
        raise ValueError(f"visual.positional_embedding has {n_pos} rows: not a square grid + 1")
    embed_dim = sd["text_projection"].shape[1]
    if sd["visual.proj"].shape != (vision_width, embed_dim):
        raise ValueError(
            f"visual.proj is {tuple(sd['visual.proj'].shape)}, "
            f"expected ({vision_width}, {embed_dim})"
        )
    vocab_size, text_width = sd["token_embedding.weight"].shape
    context_length = sd["positional_embedding"].shape[0]
    vision_layers = _count_layers(sd, "visual.")
    text_layers = _count_layers(sd, "")
    if not vision_layers or not text_layers:
        raise ValueError("the state dict has no transformer blocks for one of the towers")

    logit_scale = sd.get("logit_scale")
    vision_cfg = {
        "hidden_size": int(vision_width),
        "intermediate_size": int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "num_hidden_layers": vision_layers,
        "num_attention_heads": _heads(int(vision_width), "vision"),
        "num_channels": int(channels),
        "image_size": int(grid * patch_size),
        "patch_size": int(patch_size),
        "projection_dim": int(embed_dim),
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    text_cfg = {
        "vocab_size": int(vocab_size),
        "hidden_size": int(text_width),
        "intermediate_size": int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "num_hidden_layers": text_layers,
        "num_attention_heads": _heads(int(text_width), "text"),
        "max_position_embeddings": int(context_length),
        "projection_dim": int(embed_dim),
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        # OpenAI ids: <|startoftext|> = vocab-2, <|endoftext|> = vocab-1, padding = 0.
        "bos_token_id": int(vocab_size) - 2,
        "eos_token_id": int(vocab_size) - 1,
        "pad_token_id": 0,
    }
    config = CLIPConfig(
        text_config=text_cfg,
        vision_config=vision_cfg,
        projection_dim=int(embed_dim),
        logit_scale_init_value=float(logit_scale) if logit_scale is not None else 2.6592,
    )

    out: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, value in sd.items():
        value = value.detach()
        if value.is_floating_point():
            value = value.float()
        if key in _DIRECT_RENAMES:
            out[_DIRECT_RENAMES[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif m := _RESBLOCK.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            base = f"{tower}.encoder.layers.{m.group(2)}."
            rest = m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                # nn.MultiheadAttention packs q, k, v along dim 0.
                kind = rest.rsplit("_", 1)[-1]
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{proj}.{kind}"] = part.contiguous()
            elif rest in _BLOCK_RENAMES:
                out[base + _BLOCK_RENAMES[rest]] = value
            else:
                unused.append(key)
        elif key not in _OPENAI_METADATA_KEYS:
            unused.append(key)
    if "logit_scale" not in out:
        out["logit_scale"] = torch.tensor(config.logit_scale_init_value)
    if unused:
        logger.warning("ignoring %d unrecognised checkpoint entries: %s", len(unused), unused[:10])
    return config, out


# ------------------------------------------------------------------------------------------------
# Towers
# ------------------------------------------------------------------------------------------------


def _tower_configs(config: transformers.CLIPConfig) -> tuple[Any, Any]:
    """Sub-configs whose ``projection_dim`` matches the joint one (the towers read their own)."""
    vision = copy.deepcopy(config.vision_config)
    text = copy.deepcopy(config.text_config)
    vision.projection_dim = config.projection_dim
    text.projection_dim = config.projection_dim
    return vision, text


def _towers_from_state(
    config: transformers.CLIPConfig, state: Mapping[str, torch.Tensor]
) -> tuple[transformers.CLIPVisionModelWithProjection, transformers.CLIPTextModelWithProjection]:
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    vision_cfg, text_cfg = _tower_configs(config)
    vision = CLIPVisionModelWithProjection(vision_cfg)
    text = CLIPTextModelWithProjection(text_cfg)
    vision_sd = {
        k: v
        for k, v in state.items()
        if k.startswith("vision_model.") or k == "visual_projection.weight"
    }
    text_sd = {
        k: v
        for k, v in state.items()
        if k.startswith("text_model.") or k == "text_projection.weight"
    }
    for model, sd, name in ((vision, vision_sd, "vision"), (text, text_sd, "text")):
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ValueError(f"converted {name} weights do not fit the inferred model: {e}") from e
    return vision.float().eval(), text.float().eval()


def _load_hf_directory(
    path: Path,
) -> tuple[transformers.CLIPVisionModelWithProjection, transformers.CLIPTextModelWithProjection]:
    from transformers import (
        CLIPModel,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
    )

    config_file = path / "config.json"
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {config_file}: {e}") from e
    if model_type != "clip":
        raise ValueError(
            f"{path} holds a {model_type!r} model; a full CLIP model directory (model_type "
            "'clip', both towers) is needed"
        )
    has_safetensors = any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))
    try:
        clip, info = CLIPModel.from_pretrained(
            str(path),
            local_files_only=True,
            # Prefer safetensors; older .bin files are still read with weights_only=True.
            use_safetensors=True if has_safetensors else None,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot load a CLIP model from {path}: {e}") from e
    missing = list(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise ValueError(
            f"{path} does not hold complete CLIP weights (missing {missing[:5]}, "
            f"mismatched {mismatched[:5]}); refusing to train from partly random weights"
        )

    vision_cfg, text_cfg = _tower_configs(clip.config)
    # Build the wrappers on the meta device (no wasted random init) and move the loaded
    # sub-modules in; these are the wrappers' only children, so nothing stays on meta.
    with torch.device("meta"):
        vision = CLIPVisionModelWithProjection(vision_cfg)
        text = CLIPTextModelWithProjection(text_cfg)
    vision.vision_model = clip.vision_model
    vision.visual_projection = clip.visual_projection
    text.text_model = clip.text_model
    text.text_projection = clip.text_projection
    for model in (vision, text):
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            raise RuntimeError("internal error: a CLIP tower kept meta tensors")  # pragma: no cover
    return vision.float().eval(), text.float().eval()


def load_clip_towers(
    path: str | os.PathLike[str],
) -> tuple[transformers.CLIPVisionModelWithProjection, transformers.CLIPTextModelWithProjection]:
    """Pretrained CLIP image and text towers (float32, eval mode) from a local path.

    ``path`` is either a Hugging Face CLIP directory (``config.json`` + weights, loaded with
    ``local_files_only=True``) or an OpenAI-format checkpoint file (converted with
    :func:`openai_to_hf`). Nothing is downloaded.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"pretrained CLIP path {p} does not exist; pass a local Hugging Face CLIP directory "
            "or an OpenAI-format .pt file"
        )
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(
                f"{p} is a directory without config.json: not a Hugging Face model directory. "
                "Pass a local Hugging Face CLIP directory or an OpenAI-format .pt file"
            )
        return _load_hf_directory(p)
    config, state = openai_to_hf(load_openai_state_dict(p))
    return _towers_from_state(config, state)


__all__ = ["load_clip_towers", "load_openai_state_dict", "openai_to_hf"]
