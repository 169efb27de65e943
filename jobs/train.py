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
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("dcgh_dist.jobs.train")


# The flags are shorthands for keys of the config tree.
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
    from dcgh_dist.cli import add_config_arguments

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


def build_config(args: argparse.Namespace):
    from dcgh_dist.cli import config_from_args
    from dcgh_dist.data.presets import TRAIN_PRESETS

    return config_from_args(args, FLAGS, preset=lambda dataset: TRAIN_PRESETS.get(dataset, {}), reads=READS)


def print_table(metrics: dict, baselines: dict[str, dict | None]) -> str:
    """Markdown table: the trained model, then one column per baseline the run has."""
    rows = ["map_i2t", "map_t2i", "map_i2i", "map_t2t"]
    extra = sorted(k for k in metrics if k.startswith(("ndcg@", "p@")) and k.endswith(("_i2t", "_t2i")))
    names = [n for n, b in baselines.items() if b]
    lines = ["| metric | trained | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for k in rows + extra:
        cells = [f"{baselines[n][k]:.4f}" if k in baselines[n] else "-" for n in names]
        lines.append(f"| {k} | {metrics[k]:.4f} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table, flush=True)
    return table


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    # Before ray is imported: a local cluster then binds to loopback only.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # torch's native libraries first: loaded after pyarrow's and Ray's (as in a `ray job submit`
    # driver) they can fail with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so".
    import torch  # noqa: F401
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dcgh_dist.baselines import has_linear_baseline, linear_baselines
    from dcgh_dist.evaluation import evaluate, write_pr_plot
    from dcgh_dist.ray_session import config_session
    from dcgh_dist.train.loop import best_val_epoch
    from dcgh_dist.train import daph
    from dcgh_dist.train.runner import plan_run, run_training

    # Every check that needs no cluster runs first: a mistake costs seconds, not a Ray start.
    plan = plan_run(build_config(args), resume=args.resume)
    cfg = plan.cfg  # model.family resolved against the dataset
    is_daph, stage = cfg.train.method == "daph", cfg.daph.stage
    proxy_codes = None  # read once here when they exist already, handed to stage 2
    if is_daph and (stage == "2" or (stage == "all" and args.resume)):
        # stage 2 alone must find proxy codes of this very dataset; --resume of both stages
        # skips a stage 1 that already finished
        try:
            proxy_codes = daph.read_proxy_codes(daph.proxy_codes_path(cfg), cfg, plan.scan.fingerprint,
                                                plan.scan.info.num_classes)
        except FileNotFoundError:
            if stage == "2":
                raise
    # A local directory or an s3:// prefix, written through dcgh_dist.storage: each file appears
    # whole, the checkpoint's meta.json after its weights, metrics.json (a finished run) last.
    out = plan.output_dir
    write_output(cfg, "config.yaml", cfg.to_yaml().encode())

    stage1 = None
    with config_session(cfg.ray, dashboard=True):
        t0 = time.time()
        if is_daph and stage in ("1", "all") and proxy_codes is None:
            _, stage1 = daph.run_stage1(cfg, resume=args.resume)
            if stage == "1":
                print(json.dumps(stage1, indent=2), flush=True)
                return {"method": "daph", "stage": "1", "daph_stage1": stage1,
                        "proxy_codes": daph.proxy_codes_path(cfg)}
        if is_daph:
            outcome = run_training(cfg, plan=plan, objective="daph-hash",
                                   anchors=daph.stage2_anchors(cfg, plan, proxy_codes))
        else:
            outcome = run_training(cfg, plan=plan)
        train_s = time.time() - t0
        info = outcome.scan.info
        logger.info("evaluating checkpoint (epoch %d)%s on the query split", outcome.selected_epoch,
                    "" if args.skip_baseline else " and the untrained model")
        models = {"trained": outcome.checkpoint_dir, **({} if args.skip_baseline else {"untrained": None})}
        # every code length of a multi-length run, each scored exactly as the primary one
        evaluated = evaluate(outcome.dataset_uri, info, cfg, models, outcome.scan.files)
        trained, untrained = evaluated["trained"], evaluated.get("untrained", {})
        metrics, curves = trained[cfg.model.bits]
        baseline, base_curves = untrained.get(cfg.model.bits, (None, None))
        by_bits = {k: {**trained[k][0], "untrained": untrained[k][0] if untrained else None}
                   for k in cfg.model.extra_bits}
    linear, lin_curves = (None, None)
    if has_linear_baseline(info):
        lin = linear_baselines(outcome.dataset_uri, info, cfg, outcome.scan.files)
        linear, lin_curves = lin[cfg.model.bits]
        for k in by_bits:
            by_bits[k]["linear"] = lin[k][0]

    history = outcome.history
    result = {
        **metrics,
        "method": cfg.train.method,
        "untrained": baseline,
        "linear": linear,
        "selected_epoch": outcome.selected_epoch,
        "best_val_epoch": best_val_epoch(history) or None,
        "epochs_run": history[-1]["epoch"] if history else 0,
        "stopped_early": bool(history and history[-1].get("stopped_early")),
        "train_data": plan.cache_reason,  # cached in the object store, or streamed (and why)
        "train_seconds": train_s,
        "dataset": outcome.dataset_uri,
        "history": outcome.history,
    }
    if by_bits:  # every length, the primary one included (what jobs/report.py reads)
        result["by_bits"] = {str(cfg.model.bits): {k: v for k, v in result.items() if k != "history"},
                             **{str(k): {**v, "dataset": outcome.dataset_uri, "method": cfg.train.method}
                                for k, v in by_bits.items()}}
    if is_daph:
        result["proxy_codes"] = daph.proxy_codes_path(cfg)
        result["daph_stage1"] = stage1
    if cfg.eval.pr_curve:
        write_output(cfg, "pr_curve.png", render_png(lambda path: write_pr_plot(
            curves, {"untrained": base_curves, "linear": lin_curves}, path,
            f"{cfg.train.method.upper()} {cfg.model.bits} bits on {info.name}: Hamming-radius PR")))
    if outcome.history:
        write_output(cfg, "loss_curve.png", render_png(lambda path: write_loss_plot(outcome.history, path)))
    write_output(cfg, "metrics.json", json.dumps(result, indent=2).encode())
    print_table(metrics, {"untrained": baseline, "linear": linear})
    print(f"outputs in {out}", flush=True)
    return result


def write_output(cfg, name: str, data: bytes) -> None:
    """One output file of the run, atomically, under train.output_dir (a directory or s3://)."""
    from dcgh_dist.storage import child_uri, resolve_filesystem, write_bytes_atomic

    write_bytes_atomic(*resolve_filesystem(child_uri(cfg.train.output_dir, name), cfg.data.s3_endpoint), data)


def render_png(draw) -> bytes:
    """The bytes of the PNG ``draw(path)`` writes (matplotlib writes files)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dcgh-plot-") as tmp:
        path = os.path.join(tmp, "plot.png")
        draw(path)
        with open(path, "rb") as f:
            return f.read()


def write_loss_plot(history: list[dict], path: str) -> None:
    if not history:
        return
    from matplotlib.figure import Figure

    from dcgh_dist.train.loop import best_val_epoch

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(111)
    epochs = [h["epoch"] for h in history]
    terms = [k for k in history[0] if k.startswith("loss_") and k != "loss_pairwise_pos"]
    for k in sorted(terms, key=lambda k: k != "loss_total"):
        ax.plot(epochs, [h.get(k, float("nan")) for h in history], marker="o", label=k.removeprefix("loss_"))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if "val_map" in history[0]:
        ax2 = ax.twinx()
        ax2.plot(epochs, [h.get("val_map", float("nan")) for h in history], "k--", label="val mAP")
        best = best_val_epoch(history)
        if best:
            # the exported checkpoint, and where early stopping ended the run
            ax2.axvline(best, color="tab:green", linestyle=":", label=f"best val (epoch {best})")
        if history[-1].get("stopped_early"):
            ax2.axvline(epochs[-1], color="tab:red", linestyle=":", label=f"stopped (epoch {epochs[-1]})")
        ax2.set_ylabel("val mAP")
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    from dcgh_dist.cli import run_job

    sys.exit(run_job(main))
