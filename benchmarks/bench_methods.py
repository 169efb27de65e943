"""DCGH against DAPH at several bit lengths, same data, same splits, several seeds.

Runs ``jobs/train.py --dataset D --method M --bits K train.seed=S`` for every combination on one
local Ray cluster and prints mean ± std over the seeds of mAP over the whole retrieval database in
both directions, with the untrained model and (feature datasets) the linear baseline at each
length, and the training time.

    python benchmarks/bench_methods.py --dataset demo-features --bits 16 32 64 --seeds 0 1
    python benchmarks/bench_methods.py --dataset demo --bits 64 --seeds 0 --methods dcgh daph
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from common import machine, spread  # benchmarks/common.py: a script's own folder is on sys.path



def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="demo-features")
    p.add_argument("--methods", nargs="+", default=["dcgh", "daph"])
    p.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--multi", action="store_true",
                   help="also train each method at every --bits length in one run (model.bits as a list) per "
                        "seed, and compare each head with the separate runs and the time with theirs summed")
    p.add_argument("--skip", nargs="*", default=[], help="method-bits pairs not to run, e.g. daph-16")
    p.add_argument("overrides", nargs="*", help="extra section.key=value settings")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import torch  # noqa: F401

    from dcgh_dist.jobs import train as train_job

    from dcgh_dist.ray_session import ray_session

    work = tempfile.mkdtemp(prefix="bench-methods-")
    runs: dict[tuple[str, int], list[dict]] = {}
    with ray_session(None, num_cpus=max(4, os.cpu_count() or 1), dashboard=True):
        for bits in args.bits:
            for method in args.methods:
                if f"{method}-{bits}" in args.skip:
                    continue
                for seed in args.seeds:
                    out = os.path.join(work, f"{method}-{bits}-{seed}")
                    t0 = time.perf_counter()
                    r = train_job.main(["--dataset", args.dataset, "--output-dir", out, "--method", method,
                                        "--bits", str(bits), f"train.seed={seed}", *args.overrides]).metrics
                    r["wall"] = time.perf_counter() - t0
                    runs.setdefault((method, bits), []).append(r)

        multi: dict[str, list[dict]] = {}
        for method in args.methods if args.multi else ():
            for seed in args.seeds:
                out = os.path.join(work, f"{method}-multi-{seed}")
                t0 = time.perf_counter()
                r = train_job.main(["--dataset", args.dataset, "--output-dir", out, "--method", method,
                                    f"model.bits={list(args.bits)}", f"train.seed={seed}", *args.overrides]).metrics
                r["wall"] = time.perf_counter() - t0
                multi.setdefault(method, []).append(r)

    print(f"\nmachine: {machine()}")
    print(f"runs in {work}")
    print(f"`jobs/train.py --dataset {args.dataset} --method M --bits K {' '.join(args.overrides)}`, "
          f"seeds {args.seeds}; mean ± std over seeds\n")
    print("| bits | method | mAP image→text | mAP text→image | epochs run | wall per run (s) |")
    print("|---|---|---|---|---|---|")
    for bits in args.bits:
        for method in args.methods:
            rs = runs.get((method, bits))
            if not rs:
                continue
            print(f"| {bits} | {method.upper()} | {spread([r['map_i2t'] for r in rs])} | "
                  f"{spread([r['map_t2i'] for r in rs])} | {spread([float(r['epochs_run']) for r in rs])} | "
                  f"{statistics.mean(r['wall'] for r in rs):.0f} |")
        for method, ms in multi.items():
            heads = [r["by_bits"][str(bits)] for r in ms]
            print(f"| {bits} | {method.upper()}, one run for {args.bits} | {spread([h['map_i2t'] for h in heads])} | "
                  f"{spread([h['map_t2i'] for h in heads])} | {spread([float(r['epochs_run']) for r in ms])} | "
                  f"{statistics.mean(r['wall'] for r in ms):.0f} |")
        first = runs.get((args.methods[0], bits))
        if not first:
            continue
        for name in ("untrained", "linear"):
            if all(r.get(name) for r in first):
                print(f"| {bits} | {name} | {spread([r[name]['map_i2t'] for r in first])} | "
                      f"{spread([r[name]['map_t2i'] for r in first])} | | |")

    for method, ms in multi.items():
        if not all((method, b) in runs for b in args.bits):
            continue
        separate = [sum(runs[(method, b)][i]["wall"] for b in args.bits) for i in range(len(args.seeds))]
        ratio = [m["wall"] / s for m, s in zip(ms, separate)]
        print(f"\none {method.upper()} run for {args.bits} against {len(args.bits)} separate runs, same seeds, "
              f"this process: {statistics.mean(r['wall'] for r in ms):.0f} s against "
              f"{statistics.mean(separate):.0f} s (ratio {spread(ratio)})")


if __name__ == "__main__":
    main()
