"""fp32 or bf16 for an encoding run: bf16 only where it is measured to give the same bits."""

from __future__ import annotations

import logging
from typing import Sequence

import pyarrow.parquet as pq

from dcgh_dist.config import EncodeConfig
from dcgh_dist.storage import resolve_filesystem

logger = logging.getLogger(__name__)


def choose_precision(cfg: EncodeConfig, use_gpu: bool, ckpt_files: dict, input_uri: str, path: str,
                     meta, modalities: Sequence[str], s3_endpoint: str | None) -> tuple[str, dict | None]:
    """fp32 or bf16, with the measured bf16/fp32 bit agreement when bf16 was considered."""
    if cfg.precision == "fp32" or (cfg.precision == "auto" and not use_gpu):
        return "fp32", None
    import ray

    task = ray.remote(num_gpus=1 if use_gpu else 0)(calibrate)
    agreement = ray.get(task.remote(ckpt_files, input_uri, path, tuple(modalities), s3_endpoint,
                                    "cuda" if use_gpu else "cpu"))
    worst = min(agreement.values())
    if cfg.precision == "bf16" or worst >= cfg.bf16_min_agreement:
        logger.info("precision bf16: bit agreement with fp32 %s", agreement)
        return "bf16", agreement
    logger.info("precision fp32: bf16 agrees with fp32 on only %s of the bits (< %s)", agreement,
                cfg.bf16_min_agreement)
    return "fp32", agreement


def calibrate(ckpt_files: dict, uri: str, path: str, modalities: Sequence[str], s3_endpoint: str | None,
              device: str, rows: int = 256) -> dict[str, float]:
    """bf16-vs-fp32 bit agreement on the first ``rows`` good rows of one input file."""
    from dcgh_dist.models.encoder import Encoder

    enc = Encoder.from_files(ckpt_files, device=device)
    pre = enc.preprocessor(modalities)
    info = enc.meta.dataset_info
    cols = ["id"] + [info.image_column] * ("image" in modalities) + [info.text_column] * ("text" in modalities)
    fs, _ = resolve_filesystem(uri, s3_endpoint)
    table = pq.ParquetFile(path, filesystem=fs).read_row_group(0, columns=cols).slice(0, rows)
    x = pre({c: table.column(c).to_numpy(zero_copy_only=False) for c in cols})
    out = {}
    for m in modalities:
        ok = x[f"{m}_error"] == ""
        out[m] = enc.bit_agreement(m, x[enc.key(m)][ok]) if ok.any() else 1.0
    return out
