"""Benchmark dcgh_dist.metrics against a naive per-query mAP loop.

Random 64-bit codes and multi-label labels (24 classes, ~3 labels per item, like MIRFlickr-25K).
For each size it times:

* ``retrieval_metrics`` (mAP + NDCG@1000 + P@{1,10,100,1000}, one pass);
* ``mean_average_precision`` alone (whole-database mAP);
* the baseline: the DCGH authors' style of loop (per query: Hamming distances, relevance, stable
  argsort, cumulative precision), timed on a subset of queries and extrapolated linearly to all
  queries. Its value on the subset is checked against the fast implementation.

Prints a markdown table. Usage::

    python3 benchmarks/bench_metrics.py [--sizes 5000x20000 5000x200000] [--bits 64]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common import machine  # benchmarks/common.py: a script's own folder is on sys.path


def _random_data(
    n_query: int, n_db: int, n_bits: int, n_classes: int, labels_per_item: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Codes with a label-dependent bias so that mAP is not trivially the base rate.
    centers = np.where(rng.random((n_classes, n_bits)) < 0.5, 1.0, -1.0)

    def labels(n: int) -> np.ndarray:
        lab = rng.random((n, n_classes)) < labels_per_item / n_classes
        lab[np.arange(n), rng.integers(0, n_classes, n)] = True  # at least one label each
        return lab.astype(np.float32)

    def codes(lab: np.ndarray) -> np.ndarray:
        mean = lab @ centers / lab.sum(axis=1, keepdims=True)
        return np.where(mean + rng.normal(0.0, 1.0, mean.shape) >= 0, 1, -1).astype(np.int8)

    ql, dl = labels(n_query), labels(n_db)
    return codes(ql), codes(dl), ql, dl


def _naive_map(q: np.ndarray, d: np.ndarray, ql: np.ndarray, dl: np.ndarray) -> float:
    """Per-query loop in the style of the authors' calc_map_k_matrix (numpy instead of torch)."""
    n_bits = q.shape[1]
    d_f = d.astype(np.float32)
    dl_t = dl.T
    total = 0.0
    for i in range(q.shape[0]):
        gnd = (ql[i] @ dl_t > 0).astype(np.float64)
        tsum = gnd.sum()
        if tsum == 0:
            continue
        hamm = 0.5 * (n_bits - d_f @ q[i].astype(np.float32))
        gnd = gnd[np.argsort(hamm, kind="stable")]
        count = np.arange(1, int(tsum) + 1, dtype=np.float64)
        tindex = np.nonzero(gnd)[0] + 1.0
        total += float(np.mean(count / tindex))
    return total / q.shape[0]


def _parse_size(text: str) -> tuple[int, int]:
    try:
        n_query, n_db = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 5000x20000, got {text!r}") from None
    return n_query, n_db


def _load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (OSError, AttributeError):
        return "n/a"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", nargs="+", type=_parse_size, default=[(5000, 20000), (5000, 200000)],
        metavar="QxN", help="query x database sizes (default: 5000x20000 5000x200000)",
    )
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--classes", type=int, default=24)
    parser.add_argument("--labels-per-item", type=float, default=3.0)
    parser.add_argument(
        "--naive-queries", type=int, default=200,
        help="queries timed for the naive baseline before extrapolating (default 200)",
    )
    parser.add_argument("--chunk-size", type=int, default=None, help="queries per chunk")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        from dcgh_dist.metrics import mean_average_precision, retrieval_metrics
    except ModuleNotFoundError:
        # Run as a script from a checkout without `pip install -e .`: use the repo root.
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from dcgh_dist.metrics import mean_average_precision, retrieval_metrics

    print(
        f"Machine: {machine()}; numpy {np.__version__}; "
        f"load average before: {_load_average()}"
    )
    print(
        f"{args.bits}-bit codes, {args.classes} classes, ~{args.labels_per_item:g} labels per item; "
        "retrieval_metrics = mAP + NDCG@1000 + P@{1,10,100,1000}\n"
    )
    rows = []
    for n_query, n_db in args.sizes:
        q, d, ql, dl = _random_data(
            n_query, n_db, args.bits, args.classes, args.labels_per_item, args.seed
        )
        t0, c0 = time.perf_counter(), time.process_time()
        res = retrieval_metrics(q, d, ql, dl, chunk_size=args.chunk_size)
        t_all, c_all = time.perf_counter() - t0, time.process_time() - c0

        t0, c0 = time.perf_counter(), time.process_time()
        map_value = mean_average_precision(q, d, ql, dl, chunk_size=args.chunk_size)
        t_map, c_map = time.perf_counter() - t0, time.process_time() - c0
        assert map_value == res["map"], (map_value, res["map"])

        n_sub = min(args.naive_queries, n_query)
        t0, c0 = time.perf_counter(), time.process_time()
        naive_sub = _naive_map(q[:n_sub], d, ql[:n_sub], dl)
        t_naive = (time.perf_counter() - t0) * n_query / n_sub
        c_naive = (time.process_time() - c0) * n_query / n_sub
        fast_sub = mean_average_precision(q[:n_sub], d, ql[:n_sub], dl)
        if not math.isclose(naive_sub, fast_sub, rel_tol=0, abs_tol=1e-9):
            raise AssertionError(f"naive {naive_sub} != fast {fast_sub} on the query subset")

        rows.append(
            (
                f"{n_query:,} x {n_db:,}",
                f"{t_all:.2f} ({c_all:.2f})",
                f"{t_map:.2f} ({c_map:.2f})",
                f"{t_naive:.1f} ({c_naive:.1f}), extrapolated from {n_sub} queries",
                f"{t_naive / t_map:.1f}x",
                f"{res['map']:.4f}",
            )
        )

    header = (
        "queries x db",
        "retrieval_metrics, all metrics: wall (CPU) [s]",
        "mean_average_precision: wall (CPU) [s]",
        "naive per-query loop: wall (CPU) [s]",
        "speedup (naive / mAP)",
        "mAP",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        "\nCPU = process CPU time (all threads). The naive loop is timed on the first queries "
        f"only and scaled linearly to all queries. Load average after: {_load_average()}"
    )


if __name__ == "__main__":
    main()
