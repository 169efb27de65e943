"""The exactly-once check of an encoding run: every input id once, in a code shard or a skip list."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dcgh_dist.data.format import first_duplicate, overlapping_ranges
from dcgh_dist.index.codes import read_code_meta
from dcgh_dist.storage import display, exists, join, resolve_filesystem

logger = logging.getLogger(__name__)


def shard_name(i: int) -> str:
    """Input file #i (in sorted order) -> the name of its output shards, in every modality."""
    return f"part-{i:05d}.parquet"


def _verify_file(dataset_uri, output_uri, i, path, modalities, splits, s3_endpoint, fingerprint):
    """Check one input file against its outputs; returns counts and id ranges per modality."""
    in_fs, _ = resolve_filesystem(dataset_uri, s3_endpoint)
    out_fs, out_root = resolve_filesystem(output_uri, s3_endpoint)
    cols = ["id"] + (["split"] if splits is not None else [])
    table = pq.read_table(path, filesystem=in_fs, columns=cols)
    ids = table.column("id").to_numpy()
    if splits is not None:
        keep = pc.is_in(table.column("split"), value_set=pa.array(list(splits)))
        ids = ids[np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool)]
    ids = np.sort(ids.astype(np.int64))
    where = display(in_fs, path)
    res = {"input": len(ids), "encoded": {}, "skipped": {}, "range": {}}
    for m in modalities:
        code_path = join(out_root, m, shard_name(i))
        if not exists(out_fs, code_path):
            raise RuntimeError(f"exactly-once check: {where}: no {m} shard {code_path}")
        meta = read_code_meta(out_fs, code_path) or {}
        if meta.get("model_fingerprint") != fingerprint:
            raise RuntimeError(f"exactly-once check: {code_path} was written by model "
                               f"{meta.get('model_fingerprint')}, not {fingerprint}")
        got = pq.read_table(code_path, filesystem=out_fs, columns=["id"]).column("id").to_numpy()
        skip_path = join(out_root, "skipped", m, shard_name(i))
        skipped = (pq.read_table(skip_path, filesystem=out_fs, columns=["id"]).column("id").to_numpy()
                   if exists(out_fs, skip_path) else np.zeros(0, np.int64))
        if meta.get("skipped", len(skipped)) != len(skipped):
            raise RuntimeError(f"exactly-once check: {code_path} records {meta.get('skipped')} skipped "
                               f"rows but {skip_path} lists {len(skipped)}")
        both = np.sort(np.concatenate([got, skipped]).astype(np.int64))
        if len(both) != len(ids) or not np.array_equal(both, ids):
            missing = np.setdiff1d(ids, both)
            extra = np.setdiff1d(both, ids)
            dups = both[1:][both[1:] == both[:-1]]
            raise RuntimeError(
                f"exactly-once check failed for {where} ({m}): {len(ids)} input ids, "
                f"{len(got)} encoded + {len(skipped)} skipped; missing {missing[:5].tolist()}, "
                f"unexpected {extra[:5].tolist()}, duplicated {dups[:5].tolist()}"
            )
        res["encoded"][m] = len(got)
        res["skipped"][m] = len(skipped)
        res["range"][m] = (int(ids[0]), int(ids[-1])) if len(ids) else None
    return res


def verify_exactly_once(
    dataset_uri: str, output_uri: str, files: Sequence[str], modalities: Sequence[str],
    splits: Sequence[str] | None, s3_endpoint: str | None, fingerprint: str,
) -> dict[str, Any]:
    """Every input id appears exactly once in the outputs (code shard or skip list) of each
    modality: per input file, then across files where their id ranges overlap.

    Runs on the driver with a thread pool: it reads only id columns (8 bytes a row, in and out),
    so even a billion rows is a few GB of reads, and it needs no worker processes.
    """
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(
            lambda ip: _verify_file(dataset_uri, output_uri, ip[0], ip[1], tuple(modalities), splits,
                                    s3_endpoint, fingerprint),
            enumerate(files)))
    overlap = overlapping_ranges([r["range"][modalities[0]] for r in results])
    if overlap:
        in_fs, _ = resolve_filesystem(dataset_uri, s3_endpoint)
        all_ids = np.concatenate([
            pq.read_table(files[i], filesystem=in_fs, columns=["id"]).column("id").to_numpy() for i in overlap])
        if dup := first_duplicate(all_ids):
            raise RuntimeError(f"exactly-once check: id {dup[0]} is in more than one input file of "
                               f"{dataset_uri}; input ids must be unique")
    counts = {
        "input_rows": sum(r["input"] for r in results),
        "encoded": {m: sum(r["encoded"][m] for r in results) for m in modalities},
        "skipped": {m: sum(r["skipped"][m] for r in results) for m in modalities},
    }
    logger.info("exactly-once check passed: %s", counts)
    return counts
