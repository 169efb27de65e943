"""The Ray Data callables of encoding and evaluation: preprocessing tasks, and the model actor."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from dcgh_dist.codes import pack_relaxed  # the bit convention, defined once


class EncodeBatches:
    """Ray Data actor: preprocessed batch -> ``<modality>_codes`` (packed or relaxed), the model
    loaded once per actor through :class:`dcgh_dist.models.encoder.Encoder`.

    ``source`` is ``{"checkpoint": <ObjectRef or bytes of read_checkpoint_files>}`` (verified on
    load; no copy on disk), or ``{"config": ..., "dataset_info": ...}`` for the untrained model of
    a config (the baseline). A ``<modality>_error`` column (the preprocessor's skip mode) marks
    rows that must not reach the model: their codes are zero and the error travels on, so the
    driver can count and report them. Columns in ``passthrough`` are copied through. ``bits``:
    which of a multi-length checkpoint's code lengths (None: its primary one), or a list of them,
    each length's codes then in ``<modality>_codes@K``, all from one pass of the tower.
    """

    def __init__(self, source: dict[str, Any], modalities: Sequence[str], *, packed: bool,
                 precision: str = "fp32", device: str = "auto", cpu_threads: int | None = None,
                 passthrough: Sequence[str] = ("id",), bits: int | Sequence[int] | None = None,
                 keep_relaxed: bool = False):
        import ray
        import torch

        from dcgh_dist.models.encoder import Encoder

        if cpu_threads:
            torch.set_num_threads(max(1, cpu_threads))
        one = bits is None or isinstance(bits, int)
        if "checkpoint" in source:
            files = source["checkpoint"]
            files = ray.get(files) if isinstance(files, ray.ObjectRef) else files
            self.encoder = Encoder.from_files(files, device=device, precision=precision, bits=bits if one else None)
        else:
            from dcgh_dist.config import Config
            from dcgh_dist.data.format import DatasetInfo

            self.encoder = Encoder.untrained(Config.from_dict(source["config"]),
                                             DatasetInfo.from_json(source["dataset_info"]), device=device,
                                             bits=bits if one else None)
        # {code length: its column suffix}
        self.columns = {self.encoder.bits: ""} if one else {int(k): f"@{int(k)}" for k in bits}
        self.modalities = tuple(modalities)
        self.packed = packed
        self.keep_relaxed = keep_relaxed  # packed codes and, as <modality>_relaxed, the float16 tanh outputs
        self.passthrough = tuple(passthrough)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: batch[k] for k in self.passthrough if k in batch}
        enc = self.encoder
        n = len(batch["id"])
        for mod in self.modalities:
            x = np.asarray(batch[enc.key(mod)])
            errors = batch.get(f"{mod}_error")
            ok = np.ones(n, dtype=bool) if errors is None else np.asarray(errors, dtype=object) == ""
            relaxed = (enc.relaxed_at(mod, x if errors is None else x[ok], tuple(self.columns))
                       if ok.any() else {})
            for k, suffix in self.columns.items():
                # rows whose input could not be used keep zero codes: never a code of garbage
                codes = np.zeros((n, k // 8 if self.packed else k), dtype=np.uint8 if self.packed else np.float32)
                if ok.any():
                    codes[ok] = pack_relaxed(relaxed[k]) if self.packed else relaxed[k]
                out[f"{mod}_codes{suffix}"] = codes
                if self.keep_relaxed:
                    kept = np.zeros((n, k), dtype=np.float16)
                    if ok.any():
                        kept[ok] = relaxed[k]
                    out[f"{mod}_relaxed{suffix}"] = kept
            if errors is not None:
                out[f"{mod}_error"] = np.asarray(errors, dtype=object)
        return out


class EncodeEach:
    """Ray Data actor: each preprocessed batch through every named model of ``sources`` (``{name:
    source}``, each as :class:`EncodeBatches` takes it), relaxed codes as
    ``<name>/<modality>_codes[@K]``: one read and decode of the data for several models (a
    trained checkpoint and its untrained baseline)."""

    def __init__(self, sources: dict[str, dict[str, Any]], bits: int | Sequence[int] | None,
                 passthrough: Sequence[str] = ("id",)):
        self.models = {name: EncodeBatches(src, ("image", "text"), packed=False, passthrough=(), bits=bits)
                       for name, src in sources.items()}
        self.passthrough = tuple(passthrough)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: batch[k] for k in self.passthrough}
        for name, model in self.models.items():
            out.update({f"{name}/{k}": v for k, v in model(batch).items()})
        return out


class Preprocess:
    """A BatchPreprocessor as a Ray Data task, keeping the ``path`` column (the encoding driver
    groups rows by input file)."""

    def __init__(self, pre):
        self.pre = pre

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.pre(batch)
        out["path"] = batch["path"]
        return out


def preprocess_memory(pre, modalities: Sequence[str], rows: int) -> int:
    """Memory of a decode/tokenize worker: ~400 MiB of baseline (Python, pyarrow, PIL, the
    tokenizer; measured by Ray's memory issue detector) plus two preprocessed batches (float32
    pixels, int64 tokens)."""
    per_row = 0
    if "image" in modalities:
        per_row += 3 * pre.image_size * pre.image_size * 4
    if "text" in modalities:
        per_row += pre.context_length * 8
    return (400 << 20) + 2 * rows * per_row
