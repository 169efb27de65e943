"""Retrieval metrics (mAP@k, NDCG@k, P@k) through sharded indexes, for databases of any size.

    # everything from a checkpoint: encode queries and database, build flat indexes, evaluate
    python jobs/evaluate.py --checkpoint runs/demo/checkpoint --dataset demo --work-dir runs/demo/eval

    # from existing code shards and indexes
    python jobs/evaluate.py --dataset /data/coco --queries codes/coco-query \\
        --index-image idx/coco-image --index-text idx/coco-text --map-k 1000

Tasks: i2t (image queries, text index), t2i, i2i, t2t; a task runs when its query codes and its
index exist. Queries are the ``query`` split; every id in an index must be in a database split
(train, val, db). Each query retrieves only its top k (ranked by Hamming distance, then id: the
order of ``dcgh_dist.metrics``, whose database is in id order), so memory stays O(N) for labels instead of
O(Q x N) for distances. ``--check-reference`` also runs ``dcgh_dist.metrics`` on all codes in
memory (small data only) and prints both. See docs/INDEX.md.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Sequence

logger = logging.getLogger(__name__)


# The flags are shorthands for keys of the config tree.
FLAGS = {"index": "index.index_type", "shard_size": "index.shard_size", "map_k": "eval.map_topk",
         "ndcg_k": "eval.ndcg_k", "precision_k": "eval.precision_k"}
# What this job reads of the tree (the one-shot mode encodes and builds): an override of anything
# else would be ignored, so it is refused.
READS = ("eval", "index", "encode", "ray", "data.s3_endpoint")
# Ranking through an index needs a finite k for mAP: eval.map_topk unset means this.
DEFAULT_MAP_K = 1000


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from dcgh_dist.cli import add_config_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="dataset (labels, splits): anything --dataset of the jobs takes")
    p.add_argument("--checkpoint", help="one-shot mode: encode, build and evaluate with this checkpoint")
    p.add_argument("--work-dir", help="one-shot mode: where codes and indexes go")
    p.add_argument("--index", choices=["flat", "ivf", "multihash"], help="one-shot index type (default flat)")
    p.add_argument("--shard-size", type=int, help="one-shot: codes per index shard")
    p.add_argument("--queries", help="encode output root of the query codes (has image/ and/or text/)")
    p.add_argument("--index-image", help="index (manifest or directory) of database image codes")
    p.add_argument("--index-text", help="index (manifest or directory) of database text codes")
    p.add_argument("--tasks", default="i2t,t2i,i2i,t2t")
    p.add_argument("--map-k", type=int, help=f"mAP@k (default {DEFAULT_MAP_K})")
    p.add_argument("--ndcg-k", type=int, help="NDCG@k (default 1000)")
    p.add_argument("--precision-k", help="P@k, comma-separated (default 1,10,100,1000)")
    p.add_argument("--query-split", default="query")
    p.add_argument("--check-reference", action="store_true",
                   help="also compute dcgh_dist.metrics over all codes in memory and compare")
    p.add_argument("--output", help="write the metrics as JSON here")
    add_config_arguments(p)
    return p.parse_intermixed_args(argv)


def read_query_codes(root: str, modality: str, labels, split: str, s3_endpoint: str | None):
    """(ids, packed codes) of the query split from ``root/<modality>/*.parquet``."""
    import numpy as np

    from dcgh_dist.data.format import SPLITS, list_data_files
    from dcgh_dist.storage import join, resolve_filesystem
    from dcgh_dist.index.codes import read_code_shard

    fs, _ = resolve_filesystem(root, s3_endpoint)
    ids, codes = [], []
    for path in list_data_files(join(root, modality), s3_endpoint):
        i, c = read_code_shard(fs, path)
        ids.append(i)
        codes.append(c)
    ids, codes = np.concatenate(ids), np.concatenate(codes)
    keep = labels.split[labels.positions(ids, "query id")] == SPLITS.index(split)
    order = np.argsort(ids[keep], kind="stable")
    return ids[keep][order], codes[keep][order]


def one_shot(args, cfg, dataset: str) -> tuple[str, dict[str, str]]:
    """Encode the query split and the database splits, build one index per modality."""
    from dataclasses import replace

    from dcgh_dist.data.format import DATABASE_SPLITS
    from dcgh_dist.encoding import run_encode
    from dcgh_dist.index.build import build_index
    from dcgh_dist.models.checkpoint import verified_meta

    if not args.work_dir:
        raise ValueError("--checkpoint needs --work-dir (where codes and indexes go)")
    work = args.work_dir.rstrip("/")
    meta = verified_meta(args.checkpoint, cfg.data.s3_endpoint)
    q_root, db_root = f"{work}/codes/query", f"{work}/codes/db"
    for root, splits in ((q_root, (args.query_split,)), (db_root, DATABASE_SPLITS)):
        run_encode(args.checkpoint, dataset, root, ("image", "text"), replace(cfg.encode, splits=splits),
                   s3_endpoint=cfg.data.s3_endpoint)
    indexes = {}
    for m in ("image", "text"):
        indexes[m] = f"{work}/index/{m}"
        build_index(f"{db_root}/{m}", indexes[m], cfg.index, expected_fingerprint=meta.fingerprint,
                    config=meta.config.to_dict(), s3_endpoint=cfg.data.s3_endpoint)
    return q_root, indexes


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    from dcgh_dist.cli import setup_job_process

    setup_job_process()  # before the library imports Ray

    from dataclasses import replace

    from dcgh_dist.cli import config_from_args
    from dcgh_dist.data.presets import resolve_dataset
    from dcgh_dist.index import ShardedIndex
    from dcgh_dist.data.labels import LabelTable
    from dcgh_dist.index.evaluate import index_retrieval_metrics
    from dcgh_dist.metrics import TASKS

    cfg = config_from_args(args, FLAGS, reads=READS)
    map_k = cfg.eval.map_topk or DEFAULT_MAP_K
    data = cfg.data
    if args.checkpoint:  # demo and presets as the checkpoint's run saw them
        from dcgh_dist.models.checkpoint import read_meta

        data = read_meta(args.checkpoint, cfg.data.s3_endpoint).config.data
    dataset = resolve_dataset(replace(data, dataset=args.dataset))

    if args.checkpoint:
        from dcgh_dist.ray_session import config_session, quiet_progress

        with config_session(cfg.ray):
            quiet_progress()
            queries, index_uris = one_shot(args, cfg, dataset)
    else:
        if not args.queries:
            raise ValueError("give --queries with --index-image/--index-text, or --checkpoint with --work-dir")
        queries, index_uris = args.queries, {"image": args.index_image, "text": args.index_text}

    labels = LabelTable.read(dataset, cfg.data.s3_endpoint)
    opened: dict[str, ShardedIndex] = {}
    fingerprints = set()
    results: dict = {}
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        q_mod, db_mod = TASKS[task]
        if not index_uris.get(db_mod):
            logger.info("%s: no %s index given, skipped", task, db_mod)
            continue
        if db_mod not in opened:
            opened[db_mod] = ShardedIndex.open(index_uris[db_mod], s3_endpoint=cfg.data.s3_endpoint)
            fingerprints.add(opened[db_mod].manifest.model_fingerprint)
        index = opened[db_mod]
        q_ids, q_codes = read_query_codes(queries, q_mod, labels, args.query_split, cfg.data.s3_endpoint)
        m = index_retrieval_metrics(index, q_codes, q_ids, labels, map_topk=map_k,
                                    ndcg_k=cfg.eval.ndcg_k, precision_k=cfg.eval.precision_k)
        results.update({f"{name}_{task}": value for name, value in m.items()})
        if args.check_reference:
            ref = reference_metrics(index, q_ids, q_codes, labels, cfg, map_k)
            results.update({f"reference_{name}_{task}": value for name, value in ref.items()})
        results.setdefault("num_query", {})[task] = int(len(q_ids))
        results.setdefault("num_database", {})[task] = int(index.ntotal)
    if len(fingerprints) > 1:
        raise ValueError(f"the indexes come from different models {sorted(map(str, fingerprints))}")
    print_table(results)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results


def reference_metrics(index, q_ids, q_codes, labels, cfg, map_k: int) -> dict[str, float]:
    """dcgh_dist.metrics on every database code in memory, database in id order (small data)."""
    import numpy as np

    from dcgh_dist.index.build import read_slices, scan_code_source
    from dcgh_dist.codes import unpack_codes
    from dcgh_dist.metrics import retrieval_metrics

    src = scan_code_source(index.manifest.codes_uri, cfg.data.s3_endpoint)
    ids, codes = read_slices(src.uri, [(f.path, 0, f.rows) for f in src.files], cfg.data.s3_endpoint)
    order = np.argsort(ids, kind="stable")
    ids, codes = ids[order], codes[order]
    db_lab = labels.multihot(labels.positions(ids))
    q_lab = labels.multihot(labels.positions(q_ids))
    return retrieval_metrics(unpack_codes(q_codes), unpack_codes(codes), q_lab, db_lab,
                             map_topk=map_k, ndcg_k=cfg.eval.ndcg_k, precision_k=cfg.eval.precision_k)


def print_table(results: dict) -> None:
    from dcgh_dist.metrics import TASKS

    tasks = [t for t in TASKS if any(k.endswith(f"_{t}") for k in results)]
    names = sorted({k.rsplit("_", 1)[0] for k in results if k not in ("num_query", "num_database")},
                   key=lambda n: (n.startswith("reference_"), n))
    lines = ["| metric | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for n in names:
        cells = [f"{results[f'{n}_{t}']:.4f}" if f"{n}_{t}" in results else "-" for t in tasks]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    print("\n".join(lines), flush=True)

