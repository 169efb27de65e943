"""What re-ranking the Hamming top k x r by the relaxed (tanh) codes buys, and what it costs.

    python benchmarks/bench_rerank.py --dataset demo-features --seeds 0 1 2
    python benchmarks/bench_rerank.py --dataset demo --seeds 0

For each seed: ``jobs/train.py --dataset D`` (the plain command), then the query and database
rows encoded with the checkpoint (relaxed codes). Per task (image->text, text->image), mAP@k of
the Hamming ranking (ties by id, as the index's ``search_stable``) against the same ranking with
its first ``k x r`` re-ordered by the inner product of the query's and the item's relaxed codes
(ties kept in Hamming order), for each factor r. Latency: the re-rank step alone per query (the
candidates' relaxed codes gathered and scored), and ``search_stable`` for k and for k x r on a
flat index of the database codes (the extra fetch). Mean ± std over seeds, and the worst seed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from common import machine, spread  # benchmarks/common.py



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="demo-features")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--factors", default="2,5,10")
    p.add_argument("--k", type=int, default=100, help="mAP@k and the k of the search")
    return p.parse_args(argv)


def hamming_order(q_bits: np.ndarray, db_bits: np.ndarray) -> np.ndarray:
    """Each query's database ranking by (Hamming distance, database order)."""
    d = (q_bits[:, None, :] != db_bits[None, :, :]).sum(-1) if len(db_bits) < 2000 else _hamming(q_bits, db_bits)
    return np.argsort(d, axis=1, kind="stable")


def _hamming(q_bits, db_bits):
    q = np.where(q_bits, 1.0, -1.0).astype(np.float32)
    db = np.where(db_bits, 1.0, -1.0).astype(np.float32)
    return np.rint((q.shape[1] - q @ db.T) / 2).astype(np.int32)


def rerank(order: np.ndarray, q_relaxed: np.ndarray, db_relaxed: np.ndarray, depth: int) -> np.ndarray:
    """``order`` with its first ``depth`` columns sorted by descending relaxed inner product."""
    head = order[:, :depth]
    scores = np.einsum("qk,qdk->qd", q_relaxed, db_relaxed[head])
    inner = np.argsort(-scores, axis=1, kind="stable")
    return np.concatenate([np.take_along_axis(head, inner, axis=1), order[:, depth:]], axis=1)


def map_at_k(order: np.ndarray, q_lab: np.ndarray, db_lab: np.ndarray, k: int) -> float:
    from dcgh_dist.metrics import average_precision

    rel = (q_lab[:, None, :] * db_lab[order[:, :k]]).sum(-1) > 0
    return float(average_precision(rel).mean())


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import torch  # noqa: F401

    from dcgh_dist.jobs import train as train_job

    from dcgh_dist.data.format import read_dataset_info
    from dcgh_dist.evaluation import encode_splits
    from dcgh_dist.index import ShardedIndex
    from dcgh_dist.index.build import build_index
    from dcgh_dist.index.codes import code_shard_meta, codes_table
    from dcgh_dist.config import IndexConfig
    from dcgh_dist.models.checkpoint import read_meta
    from dcgh_dist.ray_session import ray_session

    factors = [int(x) for x in args.factors.split(",")]
    k = args.k
    work = tempfile.mkdtemp(prefix="bench-rerank-")
    rows: dict[tuple[str, str], list[float]] = {}
    lat: dict[str, list[float]] = {}
    with ray_session(None, num_cpus=max(4, os.cpu_count() or 1)):
        for seed in args.seeds:
            out = os.path.join(work, f"seed{seed}")
            r = train_job.main(["--dataset", args.dataset, "--output-dir", out, f"train.seed={seed}"]).metrics
            ckpt = os.path.join(out, "checkpoint")
            cfg = read_meta(ckpt).config
            codes = encode_splits(r["dataset"], read_dataset_info(r["dataset"]), cfg, {"trained": ckpt})["trained"]
            is_q = codes["split"] == "query"
            for task, (qm, dm) in {"i2t": ("image", "text"), "t2i": ("text", "image")}.items():
                qr, dr = codes[f"{qm}_codes"][is_q], codes[f"{dm}_codes"][~is_q]
                ql, dl = codes["labels"][is_q], codes["labels"][~is_q]
                order = hamming_order(qr >= 0, dr >= 0)
                rows.setdefault((task, "Hamming"), []).append(map_at_k(order, ql, dl, k))
                for f in factors:
                    rows.setdefault((task, f"re-rank top {f}k"), []).append(
                        map_at_k(rerank(order, qr, dr, min(f * k, order.shape[1])), ql, dl, k))
                if task == "i2t" and seed == args.seeds[0]:
                    # Latency on a flat index of these database codes, one query at a time.
                    ids = np.arange(len(dr), dtype=np.int64)
                    packed = np.packbits(dr >= 0, axis=1)
                    cdir = os.path.join(work, "codes")
                    os.makedirs(cdir, exist_ok=True)
                    import pyarrow.parquet as pq

                    pq.write_table(codes_table(ids, packed, code_shard_meta(packed.shape[1] * 8, None, dm)),
                                   os.path.join(cdir, "part-00000.parquet"))
                    build_index(cdir, os.path.join(work, "index"), IndexConfig(), use_ray=False)
                    index = ShardedIndex.open(os.path.join(work, "index"))
                    qp = np.packbits(qr >= 0, axis=1)
                    for f in [1, *factors]:
                        t0 = time.perf_counter()
                        for j in range(len(qp)):
                            _, I = index.search_stable(qp[j:j + 1], f * k)
                        lat.setdefault(f"search_stable k={f}k", []).append((time.perf_counter() - t0) / len(qp) * 1e3)
                        if f > 1:
                            t0 = time.perf_counter()
                            for j in range(len(qp)):
                                _, I = index.search_stable(qp[j:j + 1], f * k)
                                head = I[0][I[0] >= 0]
                                s = dr[head] @ qr[j]
                                head[np.argsort(-s, kind="stable")[:k]]
                            lat.setdefault(f"search_stable k={f}k + re-rank", []).append(
                                (time.perf_counter() - t0) / len(qp) * 1e3)
    print(f"\nmachine: {machine()}")
    print(f"`jobs/train.py --dataset {args.dataset}`, seeds {args.seeds}; mAP@{k}, mean ± std over seeds\n")
    print("| task | ranking | mAP@k | worst seed | gain over Hamming (mean) |")
    print("|---|---|---|---|---|")
    for (task, name), v in rows.items():
        base = np.mean(rows[(task, "Hamming")])
        worst = int(np.argmin(v))
        print(f"| {task} | {name} | {spread(v)} | seed {args.seeds[worst]}: {v[worst]:.3f} | "
              f"{np.mean(v) - base:+.3f} |")
    print(f"\nPer query (one at a time, flat index of {len(dr)} codes, first seed), ms:\n")
    print("| step | ms/query |\n|---|---|")
    for name, v in lat.items():
        print(f"| {name} | {np.mean(v):.3f} |")


if __name__ == "__main__":
    main()
