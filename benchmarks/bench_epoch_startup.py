"""First-batch wait per epoch: a training split cached in the object store against streaming.

Every streamed epoch re-runs its Ray Data pipeline, and the first batch waits for it to start
(a second or more, whatever the data size); on a small dataset that wait is most of the epoch.
A split that fits ``data.cache_bytes`` is read once into the object store instead. This runs the
real training (``run_training``, one local Ray cluster for every row) on feature datasets of
several sizes, cached and with ``data.cache_bytes=0`` (the streaming path, as before caching
existed), and on the image demo, which streams either way (augmentation), for the unchanged
streaming case. It reports, over the epochs after the first, the median first-batch wait, the
median epoch time and their ratio, the epoch as a user waits for it (validation and the
checkpoint report included), and the wall time of the whole training.

    python benchmarks/bench_epoch_startup.py                      # 2,866 and 100,000 rows
    python benchmarks/bench_epoch_startup.py --rows 2866 --epochs 6 --no-image
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from common import machine  # benchmarks/common.py: a script's own folder is on sys.path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def run(dataset: str, out: str, epochs: int, overrides: list[str]) -> dict:
    from dcgh_dist.config import load_config
    from dcgh_dist.train.runner import plan_run, run_training

    cfg = load_config(overrides=[f"data.dataset={dataset}", f"train.output_dir={out}", f"train.epochs={epochs}",
                                 "train.patience=0", "train.log_every=1000", *overrides])
    plan = plan_run(cfg)
    t0 = time.perf_counter()
    outcome = run_training(cfg, plan=plan)
    wall = time.perf_counter() - t0
    later = outcome.history[1:] or outcome.history  # the first epoch also pays worker start-up
    first = statistics.median(h["first_batch_seconds"] for h in later)
    epoch = statistics.median(h["epoch_seconds"] for h in later)
    epoch_wall = statistics.median(h["epoch_wall_seconds"] for h in later)
    return {"mode": plan.cache_reason.split(":")[0], "rows": plan.scan.split_counts["train"],
            "first": first, "epoch": epoch, "share": first / epoch, "epoch_wall": epoch_wall, "wall": wall}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[2866, 100_000], help="feature dataset sizes")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--no-image", action="store_true", help="skip the (streaming) image demo row")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import torch  # noqa: F401  (torch's libraries before pyarrow's and Ray's)

    from dcgh_dist.data.demo import ensure_demo_dataset
    from dcgh_dist.data.demo_features import generate_features_demo
    from dcgh_dist.ray_session import quiet_progress, ray_session

    work = tempfile.mkdtemp(prefix="bench-startup-")
    common = [f"train.num_workers={args.num_workers}"]
    rows = []
    with ray_session(None, num_cpus=max(4, os.cpu_count() or 1)):
        quiet_progress()
        for n in args.rows:
            data = os.path.join(work, f"features-{n}")
            generate_features_demo(data, seed=0, size=n, rows_per_file=max(1000, n // 8))
            for label, extra in (("cached", []), ("streaming", ["data.cache_bytes=0"])):
                r = run(data, os.path.join(work, f"out-{n}-{label}"), args.epochs, common + extra)
                rows.append((f"features, {n:,} rows", r))
        if not args.no_image:
            data = ensure_demo_dataset(size=1200, seed=0, data_root=work)
            r = run(data, os.path.join(work, "out-image"), max(2, min(args.epochs, 3)),
                    common + ["model.clip_preset=tiny", "data.batch_size=64"])
            rows.append(("image demo, 1,200 rows (augmented)", r))

    print(f"\nmachine: {machine()}")
    print(f"{args.num_workers} worker(s), {args.epochs} epochs, medians over epochs 2..\n")
    print("| dataset | train rows | train split | first batch (s) | epoch (s) | first batch / epoch | "
          "epoch incl. val + report (s) | training wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['rows']:,} | {r['mode']} | {r['first']:.3f} | {r['epoch']:.2f} | "
              f"{100 * r['share']:.1f}% | {r['epoch_wall']:.2f} | {r['wall']:.1f} |")


if __name__ == "__main__":
    main()
