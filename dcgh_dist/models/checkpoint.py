"""Checkpoint layout, shared by training, evaluation, encoding and serving.

A checkpoint is a directory (local, or an ``s3://`` prefix: read through ``dcgh_dist.storage``,
like datasets):

    model.pt           hasher state dict (no DDP/DeepSpeed prefixes)
    proxies.pt         class proxies
    train_state.pt     optimizers, scheduler, RNG-free counters (only needed to resume)
    meta.json          resolved config, dataset.json, epoch/step, metrics, history, fingerprint

Everything is loaded with ``torch.load(weights_only=True)``: a checkpoint never runs code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from dcgh_dist.config import Config
from dcgh_dist.data.format import DatasetInfo
from dcgh_dist.storage import display, exists, join, read_bytes, read_text, resolve_filesystem

CHECKPOINT_FORMAT = "dcgh-dist-checkpoint-v1"


@dataclass
class CheckpointMeta:
    config: Config
    dataset_info: DatasetInfo
    epoch: int = 0
    global_step: int = 0
    step_in_epoch: int = 0  # micro-steps done in epoch ``epoch`` (0 = at an epoch boundary)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    fingerprint: str = ""
    # CLIP tower configs (transformers dicts): rebuild the exact architecture, whatever preset
    # or pretrained file it came from.
    architecture: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # A checkpoint names the towers it holds: "auto" is resolved against its dataset here, so
        # every reader (encoding, serving, resume checks) sees clip or features.
        if self.config.model.family == "auto":
            from dcgh_dist.models import resolve_family

            self.config = dataclasses.replace(self.config, model=resolve_family(self.config.model, self.dataset_info))

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": CHECKPOINT_FORMAT,
                "config": self.config.to_dict(),
                "dataset_info": json.loads(self.dataset_info.to_json()),
                "epoch": self.epoch,
                "global_step": self.global_step,
                "step_in_epoch": self.step_in_epoch,
                "metrics": self.metrics,
                "history": self.history,
                "fingerprint": self.fingerprint,
                "architecture": self.architecture,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, where: str = "meta.json") -> "CheckpointMeta":
        d = json.loads(text)
        if d.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{where}: not a dcgh-dist checkpoint (format {d.get('format')!r})")
        return cls(
            config=Config.from_dict(d["config"]),
            dataset_info=DatasetInfo.from_json(json.dumps(d["dataset_info"])),
            epoch=d.get("epoch", 0),
            global_step=d.get("global_step", 0),
            step_in_epoch=d.get("step_in_epoch", 0),
            metrics=d.get("metrics", {}),
            history=d.get("history", []),
            fingerprint=d.get("fingerprint", ""),
            architecture=d.get("architecture", {}),
        )


def state_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A stable hash of the weights: index manifests record it to refuse codes of another model."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save_checkpoint(
    path: str,
    model_state: dict[str, torch.Tensor],
    proxies_state: dict[str, torch.Tensor],
    meta: CheckpointMeta,
    train_state: dict[str, Any] | None = None,
) -> None:
    os.makedirs(path, exist_ok=True)
    meta.fingerprint = state_fingerprint(model_state)
    torch.save(model_state, os.path.join(path, "model.pt"))
    torch.save(proxies_state, os.path.join(path, "proxies.pt"))
    if train_state is not None:
        torch.save(train_state, os.path.join(path, "train_state.pt"))
    with open(os.path.join(path, "meta.json"), "w") as f:
        f.write(meta.to_json())


def save_untrained(path: str, config: Config, dataset_info: DatasetInfo) -> str:
    """The untrained model of ``config`` (seeded with ``train.seed``) saved as a checkpoint: what
    benchmarks and tests encode with, and a smoke test of a deployment before any training."""
    from dcgh_dist.losses import ClassProxies, proxies_state
    from dcgh_dist.models import build_model

    torch.manual_seed(config.train.seed)
    model = build_model(config.model, image_feature_dim=dataset_info.image_feature_dim,
                        text_feature_dim=dataset_info.text_feature_dim)
    proxies = proxies_state({k: ClassProxies(dataset_info.num_classes, k) for k in config.model.lengths},
                            config.model.bits)
    save_checkpoint(path, model.state_dict(), proxies,
                    CheckpointMeta(config, dataset_info, architecture=architecture_of(model)))
    return path


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message says which file and why."""


def read_meta(uri: str, s3_endpoint: str | None = None) -> CheckpointMeta:
    """The checkpoint's meta.json alone (no weights read, nothing verified: see verified_meta)."""
    fs, root = resolve_filesystem(uri, s3_endpoint)
    path = join(root, "meta.json")
    if not exists(fs, path):
        raise FileNotFoundError(f"{uri}: not a checkpoint directory (no meta.json)")
    return _parse_meta(read_text(fs, path), display(fs, path))


def _parse_meta(text: str, where: str) -> CheckpointMeta:
    try:
        return CheckpointMeta.from_json(text, where=where)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: malformed checkpoint metadata ({type(e).__name__}: {e})") from e


def load_state(uri: str, name: str, s3_endpoint: str | None = None) -> dict[str, Any]:
    fs, root = resolve_filesystem(uri, s3_endpoint)
    path = join(root, name)
    if not exists(fs, path):
        raise FileNotFoundError(f"{uri}: checkpoint has no {name}")
    return _load_bytes(read_bytes(fs, path), display(fs, path))


def _load_bytes(data: bytes, where: str) -> dict[str, Any]:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a file that is not its own
        raise CheckpointError(f"{where}: not a loadable weights file ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: holds a {type(state).__name__}, not a state dict")
    return state


def read_checkpoint_files(uri: str, s3_endpoint: str | None = None) -> dict[str, bytes]:
    """The files a model needs (weights + meta), as bytes: shipped through Ray's object store,
    actors on other nodes need not see the driver's filesystem, and nothing is copied to disk."""
    fs, root = resolve_filesystem(uri, s3_endpoint)
    out = {}
    for name in ("model.pt", "meta.json"):
        path = join(root, name)
        if not exists(fs, path):
            raise FileNotFoundError(f"{uri}: not a checkpoint directory (no {name})")
        out[name] = read_bytes(fs, path)
    out["where"] = uri.rstrip("/").encode()
    return out


def verified_state(files: dict[str, bytes]) -> tuple[dict[str, torch.Tensor], CheckpointMeta, str]:
    """(weights, meta, where) of ``read_checkpoint_files``' bytes, the weights checked against
    the fingerprint in meta.json: what every loader of a checkpoint's model starts from."""
    where = files.get("where", b"checkpoint").decode()
    meta = _parse_meta(files["meta.json"].decode("utf-8"), f"{where}/meta.json")
    state = _load_bytes(files["model.pt"], f"{where}/model.pt")
    check_fingerprint(state, meta, where)
    return state, meta, where


def model_from_files(files: dict[str, bytes], *, device: str | torch.device = "cpu"):
    """(model in eval mode, meta) from ``read_checkpoint_files``' bytes, the weights verified
    against the fingerprint in meta.json."""
    state, meta, where = verified_state(files)
    model = build_model_for(meta)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"{where}/model.pt: weights do not fit the architecture meta.json describes ({e})"
        ) from e
    return model.to(device).eval(), meta


def check_fingerprint(state: dict[str, torch.Tensor], meta: CheckpointMeta, where: str) -> None:
    """The weights must be the ones meta.json's fingerprint names: codes, manifests and the
    server all trust that fingerprint to tell models apart."""
    actual = state_fingerprint(state)
    if meta.fingerprint and actual != meta.fingerprint:
        raise CheckpointError(
            f"{where}: model.pt's weights hash to {actual} but meta.json says {meta.fingerprint}: "
            "model.pt was replaced or meta.json belongs to another checkpoint"
        )


def verify_files(files: dict[str, bytes]) -> CheckpointMeta:
    """meta.json of ``read_checkpoint_files``' bytes, after checking that model.pt loads and its
    weights match the fingerprint: a job calls this before it starts Ray or any actor."""
    return verified_state(files)[1]


def verified_meta(uri: str, s3_endpoint: str | None = None) -> CheckpointMeta:
    """meta.json, after checking that model.pt's weights match its fingerprint."""
    return verify_files(read_checkpoint_files(uri, s3_endpoint))


def load_model(uri: str, *, device: str | torch.device = "cpu", s3_endpoint: str | None = None):
    """(model in eval mode, meta) from a checkpoint directory or ``s3://`` URI, weights verified."""
    return model_from_files(read_checkpoint_files(uri, s3_endpoint), device=device)


def architecture_of(model) -> dict[str, Any]:
    from dcgh_dist.models.towers import ClipImageTower

    if isinstance(model.image_tower, ClipImageTower):
        return {
            "vision": model.image_tower.model.config.to_dict(),
            "text": model.text_tower.model.config.to_dict(),
        }
    return {}


def build_model_for(meta: CheckpointMeta):
    """An untrained model of the checkpoint's exact architecture (weights to be loaded)."""
    from dataclasses import replace

    from dcgh_dist.models import build_model

    info = meta.dataset_info
    if meta.config.train.method == "daph" and meta.config.daph.stage == "1":
        raise CheckpointError(
            "a DAPH stage-1 checkpoint (the label-conditioned proxy nets) cannot encode queries: "
            "use the stage-2 checkpoint (<output>/checkpoint of `jobs/train.py --method daph`)"
        )
    # The towers' weights are in model.pt: never re-read the original pretrained file.
    model_cfg = replace(meta.config.model, pretrained=None)
    return build_model(
        model_cfg,
        image_feature_dim=info.image_feature_dim,
        text_feature_dim=info.text_feature_dim,
        clip_architecture=meta.architecture or None,
    )
