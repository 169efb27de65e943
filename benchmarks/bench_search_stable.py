"""One query at a time through ``ShardedIndex.search_stable``: what the fetch margin costs.

    python benchmarks/bench_search_stable.py                     # 10M random 64-bit codes, 2 shards
    python benchmarks/bench_search_stable.py --n 2M --margins 16,64,256

``search_stable`` fetches ``k + margin`` per shard and falls back to a range search (a second
scan) when the ties at the k-th distance reach the end of what it fetched. This is the Serve
path's query (one query, k=10, the shards searched in parallel): for each margin, the latency
quantiles and the share of queries that needed the range search, the margins interleaved query by
query in one process so that they see the same load. Queries are uniformly random codes, as in
``bench_serve.py``. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from typing import Sequence

import numpy as np

from common import machine, parse_n  # benchmarks/common.py: a script's own folder is on sys.path


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="10M", help="random codes in the index (default 10M)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--margins", default="16,64", help="fetch margins to compare, comma-separated")
    p.add_argument("--queries", type=int, default=300)
    args = p.parse_args(argv)

    from bench_serve import random_index

    from dcgh_dist.index import ShardedIndex

    n, margins = parse_n(args.n), [int(m) for m in args.margins.split(",")]
    work = tempfile.mkdtemp(prefix="bench-stable-")
    try:
        index_uri = random_index(work, n, "bench-random")  # 2 flat shards, as bench_serve serves them
        rng = np.random.default_rng(1)
        queries = rng.integers(0, 256, (args.queries, 8), dtype=np.uint8)
        lat = {m: [] for m in margins}
        redo = {m: 0 for m in margins}
        with ShardedIndex.open(index_uri) as index:
            for q in queries[:20]:
                index.search_stable(q[None], args.k)  # warm-up: the page cache, the pool
            for q in queries:
                for m in margins:
                    t0 = time.perf_counter()
                    D, _ = index.search_stable(q[None], args.k, margin=m)
                    lat[m].append(time.perf_counter() - t0)
                    # What search_stable decided: were the fetched list's last ties the k-th's?
                    Df, _ = index.search(q[None], args.k + m)
                    redo[m] += int(np.sort(Df[0])[-1] == D[0, args.k - 1])
            results = {m: np.array(lat[m]) * 1000 for m in margins}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = float(np.percentile(results[margins[0]], 50))
    print(f"\nMachine: {machine()}; {args.n} random 64-bit codes in 2 flat shards, one query at a "
          f"time, k={args.k}, {args.queries} queries, margins interleaved\n")
    print(f"| margin | p50 ms | p95 ms | p99 ms | queries needing a range search | p50 vs margin {margins[0]} |")
    print("|---|---|---|---|---|---|")
    for m in margins:
        ms = results[m]
        print(f"| {m} | {np.percentile(ms, 50):.1f} | {np.percentile(ms, 95):.1f} | {np.percentile(ms, 99):.1f} | "
              f"{redo[m] / args.queries:.0%} | {np.percentile(ms, 50) / base:.2f}x |")


if __name__ == "__main__":
    main()
