"""One experiment: train DCGH (or DAPH's two stages), evaluate it beside its baselines, write the
run's outputs. What ``jobs/train.py`` and ``jobs/ablate.py`` run
(their command lines: ``dcgh_dist.jobs.train``, ``dcgh_dist.jobs.ablate``).

    from dcgh_dist.jobs.train import build_config, parse_args   # the command line's config tree
    from dcgh_dist.train import run_experiment, run_sweep
    cfg = build_config(parse_args(["--dataset", "demo", "--bits", "32"]))
    result = run_experiment(cfg)            # result.metrics is metrics.json
    for r in run_sweep([cfg_a, cfg_b]): ... # several runs in one Ray session

A run writes to ``train.output_dir`` (a directory or s3://, each file atomically): checkpoint/
(selected on val), config.yaml, metrics.json (trained, the "untrained" baseline and, for feature
datasets, the "linear" hashing baseline; written last: its presence marks a finished run),
pr_curve.png, loss_curve.png and run.json (where the run's Ray Train checkpoints are).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

from dcgh_dist.baselines import has_linear_baseline, linear_baselines
from dcgh_dist.config import Config
from dcgh_dist.evaluation import evaluate, write_pr_plot
from dcgh_dist.ray_session import config_session
from dcgh_dist.report.figures import loss_figure
from dcgh_dist.storage import child_uri, resolve_filesystem, write_bytes_atomic
from dcgh_dist.train import daph
from dcgh_dist.train.loop import best_val_epoch
from dcgh_dist.train.proxy_codes import proxy_codes_path, read_proxy_codes
from dcgh_dist.train.runner import plan_run, run_training

logger = logging.getLogger(__name__)

TABLE_ROWS = ("map_i2t", "map_t2i", "map_i2i", "map_t2t")


@dataclass(frozen=True)
class Result:
    metrics: dict[str, Any]  # what metrics.json holds: trained, baselines, history, timings
    output_dir: str

    @property
    def table(self) -> str:
        return results_table(self.metrics, {n: self.metrics.get(n) for n in ("untrained", "linear")})


def results_table(metrics: Mapping, baselines: Mapping[str, Mapping | None]) -> str:
    """Markdown table: the trained model, then one column per baseline the run has."""
    extra = sorted(k for k in metrics if k.startswith(("ndcg@", "p@")) and k.endswith(("_i2t", "_t2i")))
    names = [n for n, b in baselines.items() if b]
    lines = ["| metric | trained | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for k in (*TABLE_ROWS, *extra):
        cells = [f"{baselines[n][k]:.4f}" if k in baselines[n] else "-" for n in names]
        lines.append(f"| {k} | {metrics[k]:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_experiment(cfg: Config, *, resume: bool = False, skip_baseline: bool = False) -> Result:
    """Train ``cfg`` (DCGH, or DAPH's stages per ``daph.stage``), evaluate the selected checkpoint
    at every code length beside the untrained model (unless ``skip_baseline``) and, for feature
    datasets, the linear baseline, and write the run's outputs. Joins the Ray session in effect,
    else starts a local one. ``resume`` continues the run recorded in ``train.output_dir``.
    Checks that need no cluster (config, dataset, output) run before Ray starts."""
    plan = plan_run(cfg, resume=resume)
    cfg = plan.cfg  # model.family resolved against the dataset
    is_daph, stage = cfg.train.method == "daph", cfg.daph.stage
    proxy_codes = None  # read once here when they exist already, handed to stage 2
    if is_daph and (stage == "2" or (stage == "all" and resume)):
        # stage 2 alone must find proxy codes of this very dataset; a resume of both stages
        # skips a stage 1 that already finished
        try:
            proxy_codes = read_proxy_codes(proxy_codes_path(cfg), cfg, plan.scan.fingerprint,
                                                plan.scan.info.num_classes)
        except FileNotFoundError:
            if stage == "2":
                raise
    write_output(cfg, "config.yaml", cfg.to_yaml().encode())

    stage1 = None
    with config_session(cfg.ray, dashboard=True):
        t0 = time.time()
        if is_daph and stage in ("1", "all") and proxy_codes is None:
            _, stage1 = daph.run_stage1(cfg, resume=resume)
            if stage == "1":
                return Result({"method": "daph", "stage": "1", "daph_stage1": stage1,
                               "proxy_codes": proxy_codes_path(cfg)}, plan.output_dir)
        if is_daph:
            outcome = run_training(cfg, plan=plan, objective="daph-hash",
                                   anchors=daph.stage2_anchors(cfg, plan, proxy_codes))
        else:
            outcome = run_training(cfg, plan=plan)
        train_s = time.time() - t0
        info = outcome.scan.info
        logger.info("evaluating checkpoint (epoch %d)%s on the query split", outcome.selected_epoch,
                    "" if skip_baseline else " and the untrained model")
        models = {"trained": outcome.checkpoint_dir, **({} if skip_baseline else {"untrained": None})}
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
        "history": history,
    }
    if by_bits:  # every length, the primary one included (what jobs/report.py reads)
        result["by_bits"] = {str(cfg.model.bits): {k: v for k, v in result.items() if k != "history"},
                             **{str(k): {**v, "dataset": outcome.dataset_uri, "method": cfg.train.method}
                                for k, v in by_bits.items()}}
    if is_daph:
        result["proxy_codes"] = proxy_codes_path(cfg)
        result["daph_stage1"] = stage1
    if cfg.eval.pr_curve:
        with tempfile.TemporaryDirectory(prefix="dcgh-plot-") as tmp:
            path = os.path.join(tmp, "pr_curve.png")
            write_pr_plot(curves, {"untrained": base_curves, "linear": lin_curves}, path,
                          f"{cfg.train.method.upper()} {cfg.model.bits} bits on {info.name}: Hamming-radius PR")
            with open(path, "rb") as f:
                write_output(cfg, "pr_curve.png", f.read())
    if history:
        write_output(cfg, "loss_curve.png", loss_figure(history, best_val_epoch(history)))
    write_output(cfg, "metrics.json", json.dumps(result, indent=2).encode())
    return Result(result, plan.output_dir)


def run_sweep(configs: Iterable[Config], *, skip_baseline: Sequence[bool] | None = None) -> Iterator[Result]:
    """:func:`run_experiment` of each config in turn, all in one Ray session (the first config's
    ``ray`` section): a local cluster starts once, not per run. ``skip_baseline[i]`` skips the
    untrained model of run ``i`` (the same for every loss of a seed). Yields as each run finishes."""
    configs = list(configs)
    if not configs:
        return
    skips = list(skip_baseline) if skip_baseline is not None else [False] * len(configs)
    with config_session(configs[0].ray, dashboard=True):
        for i, (cfg, skip) in enumerate(zip(configs, skips, strict=True), 1):
            logger.info("[%d/%d] run into %s", i, len(configs), cfg.train.output_dir)
            yield run_experiment(cfg, skip_baseline=skip)


def write_output(cfg: Config, name: str, data: bytes) -> None:
    """One output file of the run, atomically, under train.output_dir (a directory or s3://)."""
    write_bytes_atomic(*resolve_filesystem(child_uri(cfg.train.output_dir, name), cfg.data.s3_endpoint), data)
