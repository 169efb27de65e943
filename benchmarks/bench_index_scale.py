"""Index build and search at 10M, 100M and 1B 64-bit codes on one machine, through the jobs.

    python benchmarks/bench_index_scale.py --n 10M,100M,1B --work-dir /big/disk

For each N: codes clustered like learned ones (256 class centres, each bit flipped with
probability 1/8, so a code is ~8 bits from its centre; the last 10% uniformly random) are
written as code shards of 10M rows, one file at a time. ``python jobs/build_index.py`` then
builds a flat and an IVF index (one Ray task per 10M-code shard, shards written one at a time
and memory-mapped when searched), while a sampler records the peak resident memory of the job's
whole process tree (driver, Ray's daemons and workers). Searches run in this process:

* flat, exact top 10 for a batch of queries (90% database codes with 2 bits flipped, 10%
  uniform), and a brute-force check of the first ``--check`` queries: a numpy Hamming scan done
  shard by shard over the memory-mapped codes; the distance lists must be equal and the id sets
  equal below the 10th distance (tie-aware);
* IVF recall@10 against that exact answer (tie-aware: a returned id counts when its true
  distance is at most the true 10th distance) at several nprobe.

Everything is deleted at the end unless ``--keep``. Prints markdown tables (and JSON lines with
``--json``). Disk: ~16 bytes/code of code shards + 8 (flat) + 16 (IVF) bytes/code of index.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

import numpy as np

from common import REPO, machine, parse_n  # benchmarks/common.py

ROWS_PER_FILE = 10_000_000
CENTRES = 256


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="10M,100M", help="database sizes, comma-separated (10M,100M,1B)")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--check", type=int, default=10, help="queries checked against the brute-force scan")
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", default="8,32,128")
    p.add_argument("--types", default="flat,ivf")
    p.add_argument("--passes", type=int, default=1,
                   help="timed search passes per index; the first runs right after open (shards faulted in "
                        "from disk or page cache), the table shows it and the best of the others")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "dcgh-bench-index-scale"))
    p.add_argument("--keep", action="store_true", help="keep codes and indexes")
    p.add_argument("--learned", metavar="CODES_DIR",
                   help="replicate these 64-bit codes (a trained model's, from jobs/encode.py) with noise "
                        "instead of 256 random centres")
    p.add_argument("--json", help="append results as JSON lines here")
    return p.parse_args(argv)


def centres(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (CENTRES, 8), dtype=np.uint8)


def learned_centres(codes_dir: str) -> np.ndarray:
    """The 64-bit codes of a code-shard directory (e.g. jobs/encode.py's output for a trained
    checkpoint), to replicate with noise instead of random centres."""
    import glob

    import pyarrow.fs as pafs

    from dcgh_dist.index.codes import read_code_shard

    parts = [read_code_shard(pafs.LocalFileSystem(), f)[1] for f in sorted(glob.glob(os.path.join(codes_dir, "*.parquet")))]
    out = np.concatenate(parts)
    if out.shape[1] != 8:
        raise SystemExit(f"{codes_dir}: {out.shape[1] * 8}-bit codes; this benchmark uses 64-bit codes")
    return np.unique(out, axis=0)


def clustered(n: int, start: int, total: int, seed: int, c: np.ndarray | None = None) -> np.ndarray:
    """Rows ``start .. start + n`` of the database: a centre of ``c`` (default: 256 random ones)
    ^ noise (p = 1/8 a bit), or uniform for the last 10% of ``total``."""
    rng = np.random.default_rng(seed)
    c = centres() if c is None else c
    codes = c[rng.integers(0, len(c), n)]
    noise = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    noise &= rng.integers(0, 256, (n, 8), dtype=np.uint8)
    noise &= rng.integers(0, 256, (n, 8), dtype=np.uint8)
    codes ^= noise
    uniform = np.arange(start, start + n) >= int(total * 0.9)
    if uniform.any():
        codes[uniform] = rng.integers(0, 256, (int(uniform.sum()), 8), dtype=np.uint8)
    return codes


def write_codes(n: int, out: str, c: np.ndarray | None = None) -> float:
    """Code shards of ROWS_PER_FILE rows, one at a time; returns seconds (reused if complete)."""
    import pyarrow.parquet as pq

    from dcgh_dist.index.codes import code_shard_meta, codes_table

    done = os.path.join(out, "_COMPLETE")
    if os.path.exists(done):
        return 0.0
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    t0 = time.time()
    meta = code_shard_meta(64, "bench-clustered", "image")
    for f, start in enumerate(range(0, n, ROWS_PER_FILE)):
        rows = min(ROWS_PER_FILE, n - start)
        ids = np.arange(start, start + rows, dtype=np.int64)
        pq.write_table(codes_table(ids, clustered(rows, start, n, seed=1000 + f, c=c), meta),
                       os.path.join(out, f"part-{f:05d}.parquet"), compression="zstd", compression_level=1)
        print(f"  codes: {start + rows:,}/{n:,}", file=sys.stderr, flush=True)
    open(done, "w").close()
    return time.time() - t0


class TreeRSS:
    """Peak of the summed resident memory of a process and all its descendants, sampled."""

    def __init__(self, pid: int, every: float = 0.5):
        import psutil

        self.root, self.every, self.peak, self.peak_one = psutil.Process(pid), every, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, sum(rss))
                self.peak_one = max([self.peak_one, *rss])
            except psutil.Error:
                pass
            self._stop.wait(self.every)

    def stop(self):
        self._stop.set()
        self._t.join()


def build(codes: str, out: str, index_type: str, nlist: int) -> dict:
    """``python jobs/build_index.py`` as a user runs it; wall time and peak memory of its tree."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "jobs/build_index.py", "--codes", codes, "--output", out, "--index", index_type,
           "--shard-size", str(ROWS_PER_FILE), "--keep-builds", "1"]
    if index_type == "ivf":
        cmd += ["--nlist", str(nlist), "--nprobe", "32"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rss = TreeRSS(proc.pid)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "index shards built" in line or "trained IVF" in line:
            print("  " + line.strip().split(": ", 2)[-1], file=sys.stderr, flush=True)
    rc = proc.wait()
    rss.stop()
    if rc:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{''.join(lines[-30:])}")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    return {"build_s": time.time() - t0, "peak_rss_gib": rss.peak / 2**30, "peak_rss_one_gib": rss.peak_one / 2**30,
            "bytes": size}


def queries(n: int, nq: int, seed: int = 7, c: np.ndarray | None = None) -> np.ndarray:
    """90% database codes with 2 bits flipped, 10% uniform."""
    rng = np.random.default_rng(seed)
    near = nq - nq // 10
    rows = np.sort(rng.choice(int(n * 0.9), near, replace=False))
    q = np.empty((nq, 8), dtype=np.uint8)
    for f in np.unique(rows // ROWS_PER_FILE):
        sel = rows // ROWS_PER_FILE == f
        start = int(f) * ROWS_PER_FILE
        q[:near][sel] = clustered(min(ROWS_PER_FILE, n - start), start, n, seed=1000 + int(f), c=c)[rows[sel] - start]
    bits = np.unpackbits(q[:near], axis=1)
    for j in range(near):
        bits[j, rng.choice(64, 2, replace=False)] ^= 1
    q[:near] = np.packbits(bits, axis=1)
    q[near:] = rng.integers(0, 256, (nq - near, 8), dtype=np.uint8)
    return q


def brute_force(index, q: np.ndarray, k: int, chunk: int = 1_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Top k by (distance, id), a numpy scan of each shard's mapped codes in chunks."""
    qv = q.view(np.uint64)  # (nq, 1)
    best_d = np.full((len(q), k), 10**9, dtype=np.int64)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    for s, entry in enumerate(index.manifest.shards):
        codes = index.view(s).codes().view(np.uint64)[:, 0]
        for a in range(0, len(codes), chunk):
            d = np.bitwise_count(qv ^ codes[None, a:a + chunk]).astype(np.int64)
            part = np.argpartition(d, k - 1, axis=1)[:, :k]
            cand_d = np.concatenate([best_d, np.take_along_axis(d, part, axis=1)], axis=1)
            cand_i = np.concatenate([best_i, part + entry.id_offset + a], axis=1)
            order = np.lexsort((cand_i, cand_d), axis=1)[:, :k]
            best_d, best_i = np.take_along_axis(cand_d, order, axis=1), np.take_along_axis(cand_i, order, axis=1)
    return best_d, best_i


def codes_of(index, ids: np.ndarray) -> np.ndarray:
    """The codes of ``ids`` in a flat index of offset shards (ids 0..N-1, ROWS_PER_FILE a shard)."""
    out = np.zeros((ids.size, 8), dtype=np.uint8)
    flat = ids.ravel()
    for s, e in enumerate(index.manifest.shards):
        sel = (flat >= e.id_offset) & (flat < e.id_offset + e.rows)
        if sel.any():
            out[sel] = index.view(s).codes()[flat[sel] - e.id_offset]
    return out.reshape(*ids.shape, 8)


def _passes(fn, n: int):
    """(seconds of the first call, its result, best seconds of the n - 1 others or None)."""
    t0 = time.time()
    out = fn()
    first = time.time() - t0
    rest = []
    for _ in range(n - 1):
        t0 = time.time()
        fn()
        rest.append(time.time() - t0)
    return first, out, (min(rest) if rest else None)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from dcgh_dist.index import ShardedIndex

    types = args.types.split(",")
    c = learned_centres(args.learned) if args.learned else None
    rows = []
    print(f"machine: {machine()}", flush=True)
    for n in [parse_n(x) for x in args.n.split(",")]:
        tag = (f"{n // 10**6}M" if n < 10**9 else f"{n // 10**9}B") + ("-learned" if args.learned else "")
        work = os.path.join(args.work_dir, tag)
        codes_dir = os.path.join(work, "codes")
        print(f"N = {tag}: writing codes", file=sys.stderr, flush=True)
        gen_s = write_codes(n, codes_dir, c)
        q = queries(n, args.queries, c=c)
        k = 10
        built = {}
        for t in types:
            print(f"N = {tag}: building {t}", file=sys.stderr, flush=True)
            built[t] = build(codes_dir, os.path.join(work, f"index-{t}"), t, args.nlist)
        flat = ShardedIndex.open(os.path.join(work, "index-flat"), verify="never")
        flat_s, (D, I), flat_warm = _passes(lambda: flat.search(q, k), args.passes)
        t0 = time.time()
        bD, bI = brute_force(flat, q[:args.check], k)
        brute_s = time.time() - t0
        exact = np.array_equal(D[:args.check], bD)
        for j in range(args.check):
            below = bD[j] < bD[j, -1]
            exact &= set(I[j][D[j] < bD[j, -1]].tolist()) == set(bI[j][below].tolist())
        rss_search = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        b = built["flat"]
        rows.append({"n": tag, "index": "flat", "build_s": b["build_s"], "gen_s": gen_s,
                     "bytes_per_item": b["bytes"] / n, "peak_rss_gib": b["peak_rss_gib"],
                     "peak_rss_one_gib": b["peak_rss_one_gib"], "qps": len(q) / flat_s,
                     "qps_warm": len(q) / flat_warm if flat_warm else None,
                     "recall": 1.0, "exact": bool(exact), "brute_s": brute_s, "search_rss_gib": rss_search})
        if "ivf" in types:
            ivf = ShardedIndex.open(os.path.join(work, "index-ivf"), verify="never")
            dk = D[:, -1]
            for nprobe in [int(x) for x in args.nprobe.split(",")]:
                s, (_, Ii), warm = _passes(lambda: ivf.search(q, k, nprobe=nprobe), args.passes)
                true_d = np.bitwise_count(q.view(np.uint64) ^ codes_of(flat, np.maximum(Ii, 0)).view(np.uint64)[..., 0])
                hit = (Ii >= 0) & (true_d <= dk[:, None])
                near = slice(0, len(q) - len(q) // 10)
                b = built["ivf"]
                rows.append({"n": tag, "index": f"ivf nlist={args.nlist} nprobe={nprobe}", "build_s": b["build_s"],
                             "gen_s": gen_s, "bytes_per_item": b["bytes"] / n, "peak_rss_gib": b["peak_rss_gib"],
                             "peak_rss_one_gib": b["peak_rss_one_gib"], "qps": len(q) / s,
                             "qps_warm": len(q) / warm if warm else None,
                             "recall": float(hit.mean()), "recall_near": float(hit[near].mean()), "exact": None,
                             "brute_s": None, "search_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
            ivf.close()
        flat.close()
        for r in rows:
            if r["n"] == tag:
                print(json.dumps(r), file=sys.stderr, flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(r) + "\n")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{len(q)} queries (90% database codes with 2 bits flipped, 10% uniform), k = 10; brute-force check of "
          f"the first {args.check}.\n")
    print("| N | index | build s | bytes/item | peak RSS of the build (all processes / largest) | "
          "search q/s (first pass / warm) | recall@10 (near queries) | flat = brute force |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rec = "exact" if r["exact"] is not None else f"{r['recall']:.3f} ({r['recall_near']:.3f})"
        ok = "" if r["exact"] is None else ("yes" if r["exact"] else "**NO**")
        print(f"| {r['n']} | {r['index']} | {r['build_s']:.0f} | {r['bytes_per_item']:.2f} | "
              f"{r['peak_rss_gib']:.1f} / {r['peak_rss_one_gib']:.1f} GiB | {r['qps']:.1f} / "
              f"{r['qps_warm'] and round(r['qps_warm'], 1)} | {rec} | {ok} |")


if __name__ == "__main__":
    main()
