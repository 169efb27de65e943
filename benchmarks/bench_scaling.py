"""Training scaling through the real job on a local Ray cluster: workers and engines.

Runs ``jobs/train.py`` (tiny CLIP, demo data, no evaluation) for each setting and reads the
steady-state throughput of the last epoch (pairs/s over all workers, the first epoch excluded
because it includes pipeline and DeepSpeed start-up). Ratios are against the first row, run in
the same process on the same cluster.

    python benchmarks/bench_scaling.py
    python benchmarks/bench_scaling.py --epochs 3 --batch-size 32 --demo-size 2000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "jobs"))

SETTINGS = {
    "ddp-1": ["--num-workers", "1"],
    "ddp-2": ["--num-workers", "2"],
    "deepspeed-zero2-2": ["--num-workers", "2", "train.engine=deepspeed", "train.zero_stage=2"],
    "deepspeed-zero2-bf16-2": ["--num-workers", "2", "train.engine=deepspeed", "train.zero_stage=2",
                               "train.precision=bf16"],
}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--demo-size", type=int, default=2000)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    import ray

    import train as train_job  # jobs/train.py
    from bench_train import machine
    from dcgh_dist.config import Config, TrainConfig
    from dcgh_dist.train.runner import init_ray

    init_ray(Config(train=TrainConfig(ray_num_cpus=4)))
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.settings:
                t0 = time.time()
                result = train_job.main([
                    "--dataset", "demo", "--output-dir", os.path.join(tmp, name), "--skip-baseline",
                    "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                    f"data.demo_size={args.demo_size}", f"data.data_root={tmp}/data",
                    "train.select_on_val=false", "train.cpus_per_worker=1", *SETTINGS[name],
                ])
                last = result["history"][-1]
                rows.append({"setting": name, "pairs_per_s": last["pairs_per_s"],
                             "epoch_s": last["epoch_seconds"], "wall_s": time.time() - t0})
                print(f"  {name}: {last['pairs_per_s']:.1f} pairs/s", flush=True)
    finally:
        ray.shutdown()
    base = rows[0]["pairs_per_s"]
    print(f"\nMachine: {machine()}; tiny CLIP, {args.batch_size} pairs per worker per step, "
          f"demo {args.demo_size} pairs, last of {args.epochs} epochs\n")
    print("| setting | pairs/s (all workers) | ratio vs first | epoch s | job wall s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['pairs_per_s']:.1f} | {r['pairs_per_s'] / base:.2f} | "
              f"{r['epoch_s']:.1f} | {r['wall_s']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
