"""Ablate the DCGH loss: train named variants of one config and put them in one report.

    python jobs/ablate.py --dataset demo-features --output runs/ablation --seeds 0 1
    python jobs/ablate.py --dataset demo-features --output runs/abl --variants full no-variance --epochs 5
    python jobs/ablate.py --dataset coco --output runs/coco-abl --bits 64 --config my.yaml optim.head_lr=3e-4

Variants (the overrides each applies on top of the config the other flags give; dcgh_dist/report/
ablation.py): full (none: the reference), proxy-only, pairwise-only, no-variance, gather-local,
variance-masked. Every variant x seed is trained (dcgh_dist.train.experiment.run_sweep) into OUTPUT/runs/<variant>-s<seed>,
all in one Ray session (one local cluster for every run, or --ray-address's), with --num-workers 2
unless given (gather-local differs from full only with several workers). --seeds sets train.seed;
a variant's overrides win over the user's for the keys it ablates. Then OUTPUT/report/ (jobs/
report.py's report; each run's metrics.json gets "variant", which labels its row) and OUTPUT/
ablation.md, also printed: per variant the mean ± std over seeds of mAP i→t and t→i and the
difference from full. The untrained baseline is evaluated once per seed (with the first variant:
the loss does not change the model training starts from). A finished run already in OUTPUT/runs is refused unless --reuse, which keeps
finished runs of the same config and trains the rest. Mistakes (an unknown variant, a bad key, a
missing dataset) are one "error: ..." line with exit code 2, before Ray starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any, Sequence

logger = logging.getLogger(__name__)

DEFAULT_NUM_WORKERS = 2
# Set by the ablation itself for each run: a user override of these would make runs collide.
OWNED_KEYS = {"train.output_dir": "--output", "train.seed": "--seeds"}
# Keys whose value may differ between a kept run (--reuse) and this invocation.
IGNORED_ON_REUSE = {"ray.address", "ray.num_cpus", "ray.temp_dir"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from dcgh_dist.cli import add_config_arguments
    from dcgh_dist.report import DEFAULT_MAX_ITEMS, DEFAULT_TSNE_POINTS
    from dcgh_dist.report.ablation import VARIANTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="as for jobs/train.py: demo-features, a preset, a directory, s3://")
    p.add_argument("--output", required=True, metavar="DIR", help="runs/<variant>-s<seed>, report/, ablation.md")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME",
                   help=f"default: all ({', '.join(VARIANTS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED", help="train.seed values (default 0)")
    p.add_argument("--bits", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per worker")
    p.add_argument("--num-workers", type=int, default=DEFAULT_NUM_WORKERS,
                   help=f"default {DEFAULT_NUM_WORKERS} (gather-local equals full with one worker)")
    p.add_argument("--use-gpu", action="store_true", default=None)
    p.add_argument("--reuse", action="store_true",
                   help="keep finished runs in DIR/runs that have this config; train only the others")
    p.add_argument("--max-items", type=int, default=DEFAULT_MAX_ITEMS, help="as for jobs/report.py")
    p.add_argument("--tsne-points", type=int, default=DEFAULT_TSNE_POINTS, help="as for jobs/report.py (0: no maps)")
    add_config_arguments(p)
    return p.parse_intermixed_args(argv)


def train_argv(args: argparse.Namespace, run_dir: str, variant: str, seed: int) -> list[str]:
    """jobs/train.py's command line of one run: the user's flags and overrides, then the seed and
    the variant's overrides (later overrides win)."""
    from dcgh_dist.cli import COMMON_FLAGS
    from dcgh_dist.report.ablation import variant_overrides

    argv = ["--dataset", args.dataset, "--output-dir", run_dir, "--num-workers", str(args.num_workers)]
    for flag in ("bits", "epochs", "batch_size", "config", *COMMON_FLAGS):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    if args.use_gpu:
        argv.append("--use-gpu")
    return argv + list(args.overrides) + [f"train.seed={seed}", *variant_overrides(variant)]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(expected: dict, saved: dict) -> list[str]:
    """``key expected vs saved`` for each key that differs (model.family "auto" matches any
    family: jobs/train.py saves it resolved against the dataset)."""
    a, b = _flatten(expected), _flatten(saved)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in IGNORED_ON_REUSE or (key == "model.family" and a.get(key) == "auto"):
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, tuple):
            va = list(va)
        if va != vb:
            out.append(f"{key} {va!r} vs {vb!r}")
    return out


def finished_run(run_dir: str, variant: str, expected: dict) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly this config (with --reuse it is kept);
    a finished run of another config is a ValueError (it is never deleted)."""
    import yaml

    metrics_path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(metrics_path):
        return False
    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            saved = yaml.safe_load(f) or {}
        with open(metrics_path) as f:
            metrics = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{run_dir}: a finished run that cannot be read ({e}); remove it or choose another --output") from e
    diff = config_differences(expected, saved)
    if metrics.get("variant") not in (None, variant):
        diff.insert(0, f"variant {variant!r} vs {metrics['variant']!r}")
    if diff:
        raise ValueError(f"{run_dir} holds a finished run of another config (this ablation vs the run): "
                         + "; ".join(diff) + ". Remove it or choose another --output")
    return True


def label_run(run_dir: str, variant: str, overrides: Sequence[str]) -> dict:
    """Add ``"variant"`` (the report's row label) and its overrides to the run's metrics.json,
    atomically: the file's presence still marks a finished run."""
    import pyarrow.fs as pafs

    from dcgh_dist.storage import write_text_atomic

    path = os.path.join(run_dir, "metrics.json")
    with open(path) as f:
        metrics = json.load(f)
    metrics.update(variant=variant, variant_overrides=list(overrides))
    write_text_atomic(pafs.LocalFileSystem(), path, json.dumps(metrics, indent=2))
    return metrics


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    from dcgh_dist.cli import setup_job_process

    setup_job_process()  # before the library imports pyarrow and Ray
    import pyarrow.fs as pafs

    from dcgh_dist.config import parse_overrides
    from dcgh_dist.report import build_report
    from dcgh_dist.report.ablation import ablation_markdown, check_variants, run_name, variant_overrides
    from dcgh_dist.storage import write_text_atomic
    from dcgh_dist.jobs.train import build_config, parse_args as train_args
    from dcgh_dist.train.experiment import run_sweep
    from dcgh_dist.train.runner import plan_run

    # Every check that needs no cluster first: variants, seeds, every run's config, the dataset.
    variants = check_variants(args.variants)
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds: a seed given twice ({' '.join(map(str, args.seeds))})")
    given = _flatten(parse_overrides(args.overrides))
    for key, flag in OWNED_KEYS.items():
        if key in given:
            raise ValueError(f"{key} is set by the ablation for each run: use {flag}")
    output = os.path.abspath(args.output)
    runs_root = os.path.join(output, "runs")
    plan: list[dict] = []
    for variant in variants:
        for seed in args.seeds:
            run_dir = os.path.join(runs_root, run_name(variant, seed))
            cfg = build_config(train_args(train_argv(args, run_dir, variant, seed)))
            done = finished_run(run_dir, variant, cfg.to_dict())
            # The untrained model is the same for every variant of a seed (the loss does not
            # enter its initialisation): evaluated once per seed, with the first variant.
            plan.append({"variant": variant, "seed": seed, "dir": run_dir, "cfg": cfg, "done": done,
                         "skip_baseline": variant != variants[0]})
    kept = [p["dir"] for p in plan if p["done"]]
    if kept and not args.reuse:
        raise ValueError(f"{len(kept)} finished run(s) already in {runs_root} (e.g. {kept[0]}): pass --reuse to "
                         "keep them and train only the others, or choose another --output")
    first = plan[0]["cfg"]
    plan_run(first)  # the dataset exists and suits the config, before any cluster starts
    todo = [p for p in plan if not p["done"]]
    logger.info("ablation: %d variant(s) x %d seed(s) = %d runs (%d kept), %d worker(s) each, into %s",
                len(variants), len(args.seeds), len(plan), len(plan) - len(todo), args.num_workers, runs_root)

    for p in plan:
        if p["done"]:
            label_run(p["dir"], p["variant"], variant_overrides(p["variant"]))
    t0 = time.time()
    # One Ray session for every run (a local cluster starts once, not per run).
    runs = run_sweep([p["cfg"] for p in todo], skip_baseline=[p["skip_baseline"] for p in todo])
    for p, _ in zip(todo, runs, strict=True):
        label_run(p["dir"], p["variant"], variant_overrides(p["variant"]))
    train_s = time.time() - t0

    bits = first.model.bits
    report_dir = os.path.join(output, "report")
    report = build_report([p["dir"] for p in plan], report_dir, max_items=args.max_items,
                          tsne_points=args.tsne_points, batch_size=first.eval.batch_size,
                          s3_endpoint=first.data.s3_endpoint,
                          title=f"Ablation of the DCGH loss: {os.path.basename(first.data.dataset.rstrip('/'))}")
    seeds_of = {v: [p["seed"] for p in plan if p["variant"] == v] for v in variants}
    table = ablation_markdown(report.table, variants, bits, seeds_of)
    workers = first.train.num_workers
    where = report.dataset.name if report.dataset.name == first.data.dataset else \
        f"{report.dataset.name} ({first.data.dataset})"
    head = (f"Ablation on {where}: {bits} bits, {workers} worker(s), "
            f"seeds {', '.join(map(str, args.seeds))}, train.epochs {first.train.epochs} "
            f"(patience {first.train.patience}); mean ± sample std over seeds of each run's metrics.json "
            f"(whole database); Δ = mean − mean of full. Report: report/report.md.")
    md = f"{head}\n\n{table}\n"
    write_text_atomic(pafs.LocalFileSystem(), os.path.join(output, "ablation.md"), md)
    print(table, flush=True)
    print(f"{len(plan)} runs ({train_s / 60:.1f} min of training); ablation table in {output}/ablation.md, "
          f"report in {report_dir}/report.md", flush=True)
    return {"ablation_md": os.path.join(output, "ablation.md"), "report": os.path.join(report_dir, "report.md"),
            "runs": {(p["variant"], p["seed"]): p["dir"] for p in plan}, "table": report.table}

