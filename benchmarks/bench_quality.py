"""Retrieval quality of the plain command over seeds: trained, untrained and linear baseline.

Runs ``jobs/train.py --dataset D`` (nothing else set but the seed and the output directory) for
each seed, on one local Ray cluster, and prints mean +- standard deviation over the seeds of the
whole-database mAP in both directions, for the trained model, the untrained one and (feature
datasets) the linear hashing baseline, with the trained / linear ratio, the worst seed of each
column (a mean can hide one collapsed seed) and where training stopped.

    python benchmarks/bench_quality.py --dataset demo-features --seeds 0 1 2
    python benchmarks/bench_quality.py --dataset demo --seeds 0 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from common import machine, spread  # benchmarks/common.py: a script's own folder is on sys.path



def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="demo-features")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("overrides", nargs="*", help="extra section.key=value settings (none: the plain command)")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import torch  # noqa: F401

    from dcgh_dist.jobs import train as train_job

    from dcgh_dist.ray_session import ray_session

    work = tempfile.mkdtemp(prefix="bench-quality-")
    runs = []
    with ray_session(None, num_cpus=max(4, os.cpu_count() or 1)):
        for seed in args.seeds:
            t0 = time.perf_counter()
            r = train_job.main(["--dataset", args.dataset, "--output-dir", os.path.join(work, f"seed{seed}"),
                                f"train.seed={seed}", *args.overrides]).metrics
            r["wall"] = time.perf_counter() - t0
            runs.append(r)

    print(f"\nmachine: {machine()}")
    print(f"`jobs/train.py --dataset {args.dataset} {' '.join(args.overrides)}`, seeds {args.seeds}; "
          "mean ± std over seeds\n")
    has_linear = all(r.get("linear") for r in runs)
    head = "| direction | trained | untrained |" + (" linear | trained / linear |" if has_linear else "")
    print(head + " worst seed |")
    print("|---|---|---|" + ("---|---|" if has_linear else "") + "---|")
    for key, name in (("map_i2t", "mAP image→text"), ("map_t2i", "mAP text→image")):
        trained = [r[key] for r in runs]
        cells = [spread(trained), spread([r["untrained"][key] for r in runs])]
        # the worst seed by what the column claims: the ratio where there is a baseline
        worst_of = trained
        if has_linear:
            ratios = [r[key] / r["linear"][key] for r in runs]
            cells += [spread([r["linear"][key] for r in runs]), spread(ratios)]
            worst_of = ratios
        w = min(range(len(runs)), key=worst_of.__getitem__)
        worst = f"seed {args.seeds[w]}: {trained[w]:.3f}" + (f" ({worst_of[w]:.2f}×)" if has_linear else "")
        print(f"| {name} | " + " | ".join(cells) + f" | {worst} |")
    print()
    for seed, r in zip(args.seeds, runs):
        print(f"seed {seed}: best val epoch {r['best_val_epoch']}, {r['epochs_run']} epochs run"
              f"{' (stopped early)' if r['stopped_early'] else ''}, {r['wall']:.0f} s; {r['train_data']}")


if __name__ == "__main__":
    main()
