"""Inputs -> hash codes: the one inference path (validation, evaluation, encoding, serving).

``Encoder`` wraps a hasher and says how to feed it. It takes

* preprocessed model inputs (``relaxed`` / ``codes``: what Ray Data pipelines hand it), or
* raw inputs (``encode_texts`` with caption strings, ``encode_images`` with encoded image bytes:
  what a query server receives), preprocessed by ``preprocessor()``, which is built from the
  checkpoint's metadata alone (config, dataset info, architecture): a server has no dataset;

and returns relaxed codes (float32 tanh outputs in (-1, 1)) or packed codes (bit = relaxed >= 0,
``numpy.packbits`` order, K/8 bytes), at fp32 or under bf16 autocast. It knows nothing of Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch

from dcgh_dist.codes import pack_relaxed  # the bit convention, defined once
from dcgh_dist.models.inputs import preprocessor_for

Modality = Literal["image", "text"]
Precision = Literal["fp32", "bf16"]


@dataclass
class RawCodes:
    """Codes of raw inputs; rows whose input could not be used have ``errors[i] != ""`` and
    zero codes (never a code of garbage)."""

    codes: np.ndarray
    errors: list[str]


class Encoder:
    """A hasher in eval mode on one device, with the preprocessing its checkpoint implies."""

    def __init__(self, model, meta=None, *, device: str | torch.device | None = None,
                 precision: Precision = "fp32", bits: int | None = None):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.model = model
        self.meta = meta  # CheckpointMeta, or None for a live model (training-time validation)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if device is not None:
            self.model.to(self.device)
        self.precision = precision
        # one of the model's code lengths (a multi-length checkpoint hashes to any); None = primary
        lengths = getattr(model, "lengths", (model.bits,))
        if bits is not None and bits not in lengths:
            raise ValueError(f"this checkpoint hashes to {list(lengths)} bits, not {bits}")
        self.bits = bits or model.bits
        self._pre: dict[tuple, Any] = {}

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, uri: str, *, s3_endpoint: str | None = None, device: str = "auto",
                        precision: Precision = "fp32", bits: int | None = None) -> "Encoder":
        """From a checkpoint directory or ``s3://`` URI; the weights are verified."""
        from dcgh_dist.models.checkpoint import read_checkpoint_files

        return cls.from_files(read_checkpoint_files(uri, s3_endpoint), device=device, precision=precision, bits=bits)

    @classmethod
    def from_files(cls, files: dict[str, bytes], *, device: str = "auto", precision: Precision = "fp32",
                   bits: int | None = None) -> "Encoder":
        """From ``read_checkpoint_files``' bytes (shipped to Ray actors through the object store)."""
        from dcgh_dist.models.checkpoint import model_from_files

        device = _device(device)
        model, meta = model_from_files(files, device=device)
        return cls(model, meta, device=device, precision=precision, bits=bits)

    @classmethod
    def untrained(cls, config, dataset_info, *, device: str = "auto", bits: int | None = None) -> "Encoder":
        """The model training starts from (same seed): the baseline a trained model is scored against."""
        from dcgh_dist.models import build_model
        from dcgh_dist.models.checkpoint import CheckpointMeta, architecture_of

        torch.manual_seed(config.train.seed)
        model = build_model(config.model, image_feature_dim=dataset_info.image_feature_dim,
                            text_feature_dim=dataset_info.text_feature_dim).eval()
        meta = CheckpointMeta(config, dataset_info, architecture=architecture_of(model))
        return cls(model, meta, device=_device(device), bits=bits)

    # -- preprocessed inputs ---------------------------------------------------------------

    def key(self, modality: Modality) -> str:
        """The model-input column of a modality (``image``/``text``, or ``*_features``)."""
        return self.model.image_key if modality == "image" else self.model.text_key

    def relaxed(self, modality: Modality, x) -> np.ndarray:
        """Relaxed codes (float32 (N, K)) of preprocessed inputs, in eval mode."""
        return self.relaxed_at(modality, x, (self.bits,))[self.bits]

    @torch.no_grad()
    def relaxed_at(self, modality: Modality, x, lengths: Sequence[int]) -> dict[int, np.ndarray]:
        """``{bits: relaxed codes}`` at each of a multi-length model's ``lengths``, from one pass
        of the tower (evaluating every head of a run costs what evaluating one does)."""
        was_training = self.model.training
        self.model.eval()
        try:
            t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(self.device)
            if t.is_floating_point():
                t = t.to(next(self.model.parameters()).dtype)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                enabled=self.precision == "bf16"):
                codes = self.model.encode(modality, t, lengths)
            return {k: v.float().cpu().numpy() for k, v in codes.items()}
        finally:
            self.model.train(was_training)

    def codes(self, modality: Modality, x, *, packed: bool = True) -> np.ndarray:
        relaxed = self.relaxed(modality, x)
        return pack_relaxed(relaxed) if packed else relaxed

    def bit_agreement(self, modality: Modality, x) -> float:
        """Share of bits on which bf16 autocast agrees with fp32 for these inputs (measured)."""
        fp32 = Encoder(self.model, self.meta, device=self.device, precision="fp32", bits=self.bits).relaxed(modality, x) >= 0
        bf16 = Encoder(self.model, self.meta, device=self.device, precision="bf16", bits=self.bits).relaxed(modality, x) >= 0
        return float((fp32 == bf16).mean())

    # -- raw inputs ------------------------------------------------------------------------

    def preprocessor(self, modalities: Sequence[Modality] = ("image", "text"), *, on_error: str = "skip",
                     with_labels: bool = False):
        """The evaluation-time preprocessing of this checkpoint (resize, normalisation,
        tokenizer), from its metadata alone."""
        key = (tuple(modalities), on_error, with_labels)
        if key not in self._pre:
            if self.meta is None:
                raise ValueError("a live model without checkpoint metadata has no preprocessor")
            self._pre[key] = preprocessor_for(self.meta.config, self.meta.dataset_info,
                                              architecture=self.meta.architecture, modalities=modalities,
                                              on_error=on_error, with_labels=with_labels)
        return self._pre[key]

    def encode_texts(self, texts: Sequence[str], *, packed: bool = True) -> RawCodes:
        return self._encode_raw("text", list(texts), packed)

    def encode_images(self, images: Sequence[bytes], *, packed: bool = True) -> RawCodes:
        return self._encode_raw("image", list(images), packed)

    def _encode_raw(self, modality: Modality, items: list, packed: bool) -> RawCodes:
        column = self.meta.dataset_info.image_column if modality == "image" else self.meta.dataset_info.text_column
        if column.endswith("_features"):
            raise ValueError(f"this checkpoint's model encodes {modality} from {column!r}, not raw inputs")
        batch = {"id": np.arange(len(items), dtype=np.int64), modality: np.array(items, dtype=object)}
        x = self.preprocessor((modality,))(batch)
        errors = [str(e) for e in x[f"{modality}_error"]]
        ok = np.array([e == "" for e in errors])
        width = self.bits // 8 if packed else self.bits
        out = np.zeros((len(items), width), dtype=np.uint8 if packed else np.float32)
        if ok.any():
            out[ok] = self.codes(modality, x[self.key(modality)][ok], packed=packed)
        return RawCodes(out, errors)


def _device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
