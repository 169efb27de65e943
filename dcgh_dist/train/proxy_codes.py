"""DAPH's proxy codes on disk: the file stage 1 writes and stage 2 reads, checked against the
dataset and model at hand (a lower layer than the stages' orchestration in ``train/daph.py``).

One ``.npz`` of plain arrays (loaded with ``allow_pickle=False``: never a pickle): for every
training row its image-aware and text-aware ±1 codes, its labels, and the class codes, plus a
``meta`` entry recording the format, the config and the dataset's fingerprint
(``DatasetScan.fingerprint``: ids, splits and labels). With several code lengths the primary
length's codes have the plain names and each extra length ``K``'s are ``image_codes@K``,
``text_codes@K`` and ``class_codes@K``.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from dcgh_dist.codes import length_key
from dcgh_dist.config import Config
from dcgh_dist.storage import child_uri, exists, read_bytes, resolve_filesystem, write_bytes_atomic

PROXY_CODES_FORMAT = "dcgh-dist/daph-proxy-codes/1"
PROXY_CODES_FILE = "daph_proxy_codes.npz"

def proxy_codes_path(cfg: Config) -> str:
    return cfg.daph.proxy_codes or child_uri(cfg.train.output_dir, PROXY_CODES_FILE)


def signs(x: np.ndarray) -> np.ndarray:
    """+-1 as int8; an exact 0 (measure zero for real outputs) maps to +1, as the metrics' binarisation does."""
    return np.where(np.asarray(x) >= 0, 1, -1).astype(np.int8)


def code_keys(cfg: Config) -> list[str]:
    """The arrays of ±1 codes a proxy-code file holds for ``cfg``'s code lengths."""
    primary = cfg.model.bits
    return [length_key(name, k, primary) for k in cfg.model.lengths
            for name in ("image_codes", "text_codes", "class_codes")]


def write_proxy_codes(path: str, codes: dict[str, np.ndarray], cfg: Config, fingerprint: str) -> None:
    meta = {"format": PROXY_CODES_FORMAT, "dataset_fingerprint": fingerprint, "bits": cfg.model.bits,
            "lengths": list(cfg.model.lengths),
            "num_classes": int(codes["labels"].shape[1]), "rows": int(len(codes["id"])),
            "train_mode": cfg.daph.proxy_codes_train_mode, "config": cfg.to_dict()}
    buf = io.BytesIO()
    np.savez(buf, id=codes["id"].astype(np.int64), labels=codes["labels"].astype(np.uint8),
             **{k: signs(codes[k]) for k in code_keys(cfg)}, meta=np.array(json.dumps(meta)))
    fs, p = resolve_filesystem(path, cfg.data.s3_endpoint)
    write_bytes_atomic(fs, p, buf.getvalue())


def read_proxy_codes(path: str, cfg: Config, fingerprint: str, num_classes: int) -> dict[str, Any]:
    """The arrays and meta of a proxy-code file, checked against the dataset and model at hand."""
    fs, p = resolve_filesystem(path, cfg.data.s3_endpoint)
    if not exists(fs, p):
        raise FileNotFoundError(
            f"{path}: no DAPH proxy codes; run stage 1 first (`--method daph --stage 1`, or `--stage all`), "
            "or point daph.proxy_codes at them"
        )
    try:
        with np.load(io.BytesIO(read_bytes(fs, p)), allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
        meta = json.loads(str(out.pop("meta")))
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a DAPH proxy-code file ({type(e).__name__}: {e})") from e
    if meta.get("format") != PROXY_CODES_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {PROXY_CODES_FORMAT!r}")
    if meta["dataset_fingerprint"] != fingerprint:
        raise ValueError(
            f"{path}: these proxy codes were made from another dataset (fingerprint "
            f"{meta['dataset_fingerprint']}, this one is {fingerprint}: its ids, splits or labels "
            "differ); re-run stage 1 on this dataset"
        )
    lengths = meta.get("lengths", [meta["bits"]])  # files of one length before multi-length runs
    if lengths != list(cfg.model.lengths) or meta["num_classes"] != num_classes:
        want = cfg.model.bits if len(cfg.model.lengths) == 1 else list(cfg.model.lengths)
        have = meta["bits"] if len(lengths) == 1 else lengths
        raise ValueError(
            f"{path}: proxy codes of {have} bits and {meta['num_classes']} classes; this run "
            f"has model.bits={want} and {num_classes} classes"
        )
    out["meta"] = meta
    return out
