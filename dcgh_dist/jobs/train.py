"""Train DCGH (or DAPH) on a Ray cluster and evaluate it.

    python jobs/train.py --dataset demo                      # local Ray, built-in demo, CPU
    python jobs/train.py --dataset demo --method daph        # DAPH: stage 1 then stage 2
    python jobs/train.py --dataset /data/coco --bits 32 --epochs 20 --config my.yaml optim.head_lr=3e-4
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train.py --dataset coco

Writes to --output-dir: checkpoint/ (selected on val), config.yaml, metrics.json (trained, the
"untrained" baseline and, for feature datasets, the "linear" hashing baseline), pr_curve.png,
loss_curve.png (where early stopping ended the run), run.json (where the run's Ray Train checkpoints
are: <train.storage_path, default ray_results/>/<run name>). Mistakes are reported as one
"error: ..." line with exit code 2 (--debug shows the traceback), before Ray starts where they can be.
The library behind it: dcgh_dist.train.experiment (run_experiment, run_sweep).
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from dcgh_dist.cli import add_config_arguments, config_from_args
from dcgh_dist.config import Config
from dcgh_dist.data.presets import TRAIN_PRESETS

# The command line's flags are shorthands for keys of the config tree.
FLAGS = {
    "dataset": "data.dataset", "bits": "model.bits", "epochs": "train.epochs",
    "batch_size": "data.batch_size", "num_workers": "train.num_workers", "use_gpu": "train.use_gpu",
    "output_dir": "train.output_dir",
    "method": "train.method", "stage": "daph.stage",
}
# What training reads of the tree; an override of encode.*, index.* or prepare.* (other jobs'
# sections) would be ignored, so it is refused.
READS = ("model", "loss", "optim", "data", "train", "eval", "daph", "ray")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The training command line (``jobs/train.py``'s): flags, ``--config``, overrides."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="demo, a preset (coco, mirflickr25k, nuswide, nuswide-top10), a directory or s3:// URI")
    p.add_argument("--bits", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per worker")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--use-gpu", action="store_true", default=None)
    p.add_argument("--output-dir")
    p.add_argument("--method", choices=["dcgh", "daph"], help="dcgh (default) or daph (two stages)")
    p.add_argument("--stage", choices=["1", "2", "all"],
                   help="daph: 1 = the proxy network (writes the proxy codes), 2 = the hashing networks, all (default)")
    p.add_argument("--resume", action="store_true", help="continue the run recorded in --output-dir")
    p.add_argument("--skip-baseline", action="store_true", help="don't evaluate the untrained model")
    add_config_arguments(p)
    # Intermixed: overrides may sit between flags (`train.engine=deepspeed --num-workers 2 ...`), as
    # people type them; plain parse_args rejects positionals that follow an option.
    return p.parse_intermixed_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    """The validated config tree of a parsed command line: defaults, the dataset's preset, the YAML
    file, the flags, the overrides."""
    return config_from_args(args, FLAGS, preset=lambda dataset: TRAIN_PRESETS.get(dataset, {}), reads=READS)


def main(argv: Sequence[str] | None = None):
    """Train, evaluate, print the results table; returns the run's
    :class:`dcgh_dist.train.experiment.Result`."""
    args = parse_args(argv)
    from dcgh_dist.cli import setup_job_process

    setup_job_process()  # before the library imports Ray
    from dcgh_dist.train.experiment import run_experiment

    result = run_experiment(build_config(args), resume=args.resume, skip_baseline=args.skip_baseline)
    if result.metrics.get("stage") == "1":  # DAPH's stage 1 alone: no evaluation to show
        print(json.dumps(result.metrics["daph_stage1"], indent=2), flush=True)
    else:
        print(result.table, flush=True)
        print(f"outputs in {result.output_dir}", flush=True)
    return result
