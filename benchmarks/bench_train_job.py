"""The training job against the plain-torch loop of the same model, batch and step, in one run.

(a) the exact step of ``bench_train.py`` in plain torch (no Ray, all of the machine's cores as
torch threads; then again in this process once a Ray cluster is running beside it), and (b)
``jobs/train.py --dataset D`` with 1 and 2 workers, in the same process on that cluster (with its
dashboard, as the job starts it). Prints pairs/s of each and the ratio to (a), then where an epoch of the
job goes: data wait, host-to-device, forward, loss (with the gather of every worker's codes),
backward, optimizer, the loop's own remainder, validation, and the checkpoint report. Medians
over the epochs after the first (the first also pays the workers' start-up).

    python benchmarks/bench_train_job.py                          # the demo, 4 epochs, 1 and 2 workers
    python benchmarks/bench_train_job.py --batch-size 64          # the same at 64 pairs per worker
    python benchmarks/bench_train_job.py --workers 1 --epochs 3
    python benchmarks/bench_train_job.py --features-rows 100000 --workers 1   # the phases only

With ``--features-rows N`` the job trains on a generated N-row feature dataset (demo-features'
shape) and only the phases are printed: the plain step is the CLIP preset's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Sequence

from common import machine  # benchmarks/common.py: a script's own folder is on sys.path


PHASES = ("data wait", "h2d", "forward", "loss_and_gather", "backward", "optimizer", "loop other",
          "validation", "report")


def epoch_split(history: list[dict]) -> dict[str, float]:
    """Median seconds per epoch in each phase, over epochs 2..n. An epoch's wall time runs from
    the end of the previous epoch's training: that epoch's validation and report, then this
    epoch's training, so the report of epoch e-1 is wall(e) - train(e) - validation(e-1)."""
    per: dict[str, list[float]] = {p: [] for p in PHASES}
    for prev, h in zip(history, history[1:]):
        wait = h["data_wait_share"] * h["epoch_seconds"]
        measured = {k: h.get(f"seconds_{k}", 0.0) for k in ("h2d", "forward", "loss_and_gather", "backward", "optimizer")}
        per["data wait"].append(wait)
        for k, v in measured.items():
            per[k].append(v)
        per["loop other"].append(h["epoch_seconds"] - wait - sum(measured.values()))
        per["validation"].append(h.get("seconds_validation", 0.0))
        per["report"].append(h["epoch_wall_seconds"] - h["epoch_seconds"] - prev.get("seconds_validation", 0.0))
    return {p: statistics.median(v) for p, v in per.items() if v}


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="demo")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--plain-steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=None, help="pairs per worker per step (default: the preset's)")
    p.add_argument("--features-rows", type=int, default=None,
                   help="train on a generated feature dataset of this many rows instead (no plain loop)")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import torch

    from dcgh_dist.jobs import train as train_job
    from bench_train import time_steps

    from dcgh_dist.config import load_config
    from dcgh_dist.data.presets import TRAIN_PRESETS
    from dcgh_dist.ray_session import ray_session

    work = tempfile.mkdtemp(prefix="bench-train-job-")
    cores = len(os.sched_getaffinity(0))
    plain = None
    if args.features_rows:
        from dcgh_dist.data.demo_features import generate_features_demo

        args.dataset = os.path.join(work, f"features-{args.features_rows}")
        generate_features_demo(args.dataset, seed=0, size=args.features_rows,
                               rows_per_file=max(1000, args.features_rows // 8))
        cfg = load_config(preset=TRAIN_PRESETS["demo-features"])
        preset, batch = "features", cfg.data.batch_size
    else:
        cfg = load_config(preset=TRAIN_PRESETS.get(args.dataset))  # the dataset's own training preset
        preset, batch = cfg.model.clip_preset, args.batch_size or cfg.data.batch_size
        torch.set_num_threads(cores)
        plain = time_steps(preset, batch, args.plain_steps, 3, "fp32", "cpu")
        print(f"plain torch, {preset}, batch {batch}, {cores} threads: {plain:.1f} pairs/s", flush=True)

    jobs = {}
    plain_ray_up = None
    with ray_session(None, num_cpus=max(4, os.cpu_count() or 1), dashboard=True):
        if plain:
            # The same plain step in this process with a Ray cluster merely running beside it:
            # what Ray's own processes cost the computation, before any of the job's machinery.
            plain_ray_up = time_steps(preset, batch, args.plain_steps, 3, "fp32", "cpu")
            print(f"plain torch, Ray cluster up: {plain_ray_up:.1f} pairs/s", flush=True)
        for w in args.workers:
            t0 = time.perf_counter()
            r = train_job.main(["--dataset", args.dataset, "--epochs", str(args.epochs), "--num-workers", str(w),
                                "--output-dir", os.path.join(work, f"w{w}"), "--skip-baseline", "train.patience=0",
                                *(["--batch-size", str(args.batch_size)] if args.batch_size else [])]).metrics
            r["wall"] = time.perf_counter() - t0
            jobs[w] = r

    print(f"\nmachine: {machine()}")
    print(f"`jobs/train.py --dataset {args.dataset}` ({preset}, batch {batch} per worker, fp32, "
          f"{args.epochs} epochs); medians over epochs 2–{args.epochs}\n")
    ratio = (lambda x: f"{x / plain:.2f}") if plain else (lambda x: "")
    print("| loop | pairs/s (training) | vs plain | pairs/s (epoch incl. validation + report) | vs plain |")
    print("|---|---|---|---|---|")
    if plain:
        print(f"| plain torch, {cores} threads | {plain:.1f} | 1.00 | | |")
        print(f"| plain torch, {cores} threads, Ray cluster up | {plain_ray_up:.1f} | {ratio(plain_ray_up)} | | |")
    for w, r in jobs.items():
        later = r["history"][1:]
        train_pps = statistics.median(h["pairs_per_s"] for h in later)
        wall_pps = statistics.median(h["pairs_per_s"] * h["epoch_seconds"] / h["epoch_wall_seconds"] for h in later)
        print(f"| job, {w} worker{'s' if w > 1 else ''} | {train_pps:.1f} | {ratio(train_pps)} | "
              f"{wall_pps:.1f} | {ratio(wall_pps)} |")
    print("\nSeconds per epoch, by phase (rank 0):\n")
    print("| phase | " + " | ".join(f"{w} worker{'s' if w > 1 else ''}" for w in jobs) + " |")
    print("|---|" + "---|" * len(jobs))
    splits = {w: epoch_split(r["history"]) for w, r in jobs.items()}
    for phase in PHASES:
        print(f"| {phase} | " + " | ".join(f"{splits[w].get(phase, float('nan')):.2f}" for w in jobs) + " |")
    print("| job wall, start to metrics.json | " + " | ".join(f"{r['wall']:.0f}" for r in jobs.values()) + " |")
    return {"plain": plain, "plain_ray_up": plain_ray_up, "jobs": jobs, "splits": splits}


if __name__ == "__main__":
    main()
