"""Training scaling through the real job on a local Ray cluster: workers and engines.

Runs ``jobs/train.py`` (tiny CLIP, demo data, no evaluation) for each setting and reads the
steady-state throughput of the last epoch (pairs/s over all workers, the first epoch excluded
because it includes pipeline and DeepSpeed start-up) and the share of that epoch rank 0 spent
blocked on the data pipeline. Ratios are against the first row, run in
the same process on the same cluster.

    python benchmarks/bench_scaling.py
    python benchmarks/bench_scaling.py --epochs 3 --batch-size 32 --demo-size 2000
    # on GPU nodes (the authors' setting: ViT-B/32, 128 pairs per worker):
    python benchmarks/bench_scaling.py --use-gpu --batch-size 128 --override model.clip_preset=vit-b-32 \
        --settings ddp-1 ddp-2 deepspeed-zero2-bf16-2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import subprocess
import tempfile
import threading
import time
from typing import Sequence

from common import machine  # benchmarks/common.py: a script's own folder is on sys.path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SETTINGS = {
    "ddp-1": ["--num-workers", "1"],
    "ddp-2": ["--num-workers", "2"],
    "deepspeed-zero2-2": ["--num-workers", "2", "train.engine=deepspeed", "train.zero_stage=2"],
    "deepspeed-zero2-bf16-2": ["--num-workers", "2", "train.engine=deepspeed", "train.zero_stage=2",
                               "train.precision=bf16"],
}


class GpuUtilSampler:
    """Mean GPU utilisation over a job, sampled from ``nvidia-smi`` twice a second on this node.

    Covers the whole job (start-up and evaluation included), so it is a lower bound on the
    utilisation during training steps; the data-wait share is the per-step figure.
    """

    def __init__(self, period_s: float = 0.5):
        self.period_s, self.samples = period_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5, check=True).stdout
                self.samples.append(sum(float(x) for x in out.split()) / max(len(out.split()), 1))
            except (OSError, subprocess.SubprocessError, ValueError):
                return  # no nvidia-smi: the column stays empty rather than wrong

    def __enter__(self) -> "GpuUtilSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--demo-size", type=int, default=2000)
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (the GPU comparison)")
    p.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config overrides for every setting, e.g. model.clip_preset=vit-b-32")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    import yaml

    from dcgh_dist.jobs import train as train_job
    from dcgh_dist.ray_session import ray_session

    rows = []
    with ray_session(num_cpus=4, dashboard=True):
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.settings:
                t0 = time.time()
                with GpuUtilSampler() if args.use_gpu else contextlib.nullcontext() as gpu:
                    result = train_job.main([
                        "--dataset", "demo", "--output-dir", os.path.join(tmp, name), "--skip-baseline",
                        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                        f"data.demo_size={args.demo_size}", f"data.data_root={tmp}/data",
                        "train.select_on_val=false", "train.cpus_per_worker=1", *SETTINGS[name],
                        *(["--use-gpu"] if args.use_gpu else []), *args.override,
                    ]).metrics
                last = result["history"][-1]
                rows.append({"setting": name, "pairs_per_s": last["pairs_per_s"],
                             "epoch_s": last["epoch_seconds"], "data_wait": last.get("data_wait_share"),
                             "first_batch_s": last.get("first_batch_seconds"),
                             "gpu_util": gpu.mean if gpu is not None else None,
                             "wall_s": time.time() - t0})
                with open(os.path.join(tmp, name, "config.yaml")) as f:  # the resolved config
                    preset = yaml.safe_load(f)["model"]["clip_preset"]
                print(f"  {name}: {last['pairs_per_s']:.1f} pairs/s", flush=True)
    base = rows[0]["pairs_per_s"]
    print(f"\nMachine: {machine()}; CLIP preset {preset}, {args.batch_size} pairs per worker per step, "
          f"demo {args.demo_size} pairs, last of {args.epochs} epochs\n")
    print("| setting | pairs/s (all workers) | ratio vs first | epoch s | data-wait share (rank 0) "
          "| of which first batch s | GPU util (job mean) | job wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        wait = "-" if r["data_wait"] is None else f"{100 * r['data_wait']:.0f}%"
        first = "-" if r["first_batch_s"] is None else f"{r['first_batch_s']:.1f}"
        util = "-" if r["gpu_util"] is None else f"{r['gpu_util']:.0f}%"
        print(f"| {r['setting']} | {r['pairs_per_s']:.1f} | {r['pairs_per_s'] / base:.2f} | "
              f"{r['epoch_s']:.1f} | {wait} | {first} | {util} | {r['wall_s']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
