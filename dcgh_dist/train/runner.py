"""Driver side of training: resolve the dataset, start/join Ray, run a TorchTrainer, collect.

``run_training(cfg)`` is what ``jobs/train.py`` calls; it returns the path of the selected
checkpoint and the per-epoch history. The same call works on a laptop (a local Ray cluster is
started, bound to 127.0.0.1) and inside ``ray job submit`` on a real cluster (it joins it).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any

from dcgh_dist.config import Config
from dcgh_dist.data.format import DatasetScan, scan_dataset

logger = logging.getLogger(__name__)


def init_ray(cfg: Config) -> bool:
    """Join the configured/ambient cluster, or start a local one. Returns True if we started it.

    A local cluster is bound to 127.0.0.1 and gets ``ray_num_cpus`` logical CPUs (default
    max(4, cores)): with exactly as many logical CPUs as cores, training workers that hold every
    CPU starve the Ray Data tasks feeding them and the run hangs.
    """
    import ray

    if ray.is_initialized():
        return False
    address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS")
    # Keep every Ray socket on loopback when we start the cluster ourselves.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    if address:
        # Joining a cluster (e.g. inside `ray job submit`): the job's runtime env applies, and
        # passing another here conflicts with it. Set env vars with --runtime-env-json.
        ray.init(address=address, log_to_driver=True)
        return False
    num_cpus = cfg.train.ray_num_cpus or max(4, os.cpu_count() or 1)
    ray.init(
        num_cpus=num_cpus,
        # Ray Train's controller watches its actors through the State API, which the dashboard
        # serves; without it the logs fill with "State API may be temporarily unavailable".
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        # Loopback only. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 does the same but is read when ray is
        # first imported, which a library cannot guarantee to precede.
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    return True


def resolve_dataset(cfg: Config) -> str:
    """A dataset name/path/URI -> the URI to read. ``demo`` is generated on first use."""
    name = cfg.data.dataset
    if name == "demo":
        from dcgh_dist.data.demo import ensure_demo_dataset

        return ensure_demo_dataset(cfg.data.demo_size, cfg.data.demo_seed, cfg.data.data_root)
    if name.startswith("s3://") or os.path.isdir(name):
        return name
    from dcgh_dist.data.presets import DATASET_PRESETS, preset_path

    if name in DATASET_PRESETS:
        return preset_path(name, cfg.data.data_root)
    raise ValueError(
        f"dataset {name!r} is neither 'demo', a known preset ({sorted(DATASET_PRESETS)}), "
        "an existing directory nor an s3:// URI"
    )


def quiet_data_progress() -> None:
    """One overall progress bar per Ray Data execution, none per operator: the training loop
    logs its own progress, and per-operator bars flood non-interactive logs (ray job logs, CI)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_operator_progress_bars = False
    ctx.enable_progress_bars = sys.stderr.isatty()


@dataclass
class TrainOutcome:
    checkpoint_dir: str  # the selected checkpoint (best val mAP, else last), copied locally
    history: list[dict[str, Any]] = field(default_factory=list)
    selected_epoch: int = 0
    dataset_uri: str = ""
    scan: DatasetScan | None = None


def steps_per_epoch(train_rows: int, batch_size: int, num_workers: int) -> int:
    """Each worker gets floor(rows / workers) rows (equal streaming split) and drops the last
    partial batch."""
    return (train_rows // num_workers) // batch_size


def run_training(cfg: Config, *, resume: bool = False) -> TrainOutcome:
    import ray.train
    from ray.train.torch import TorchTrainer

    from dcgh_dist.data.pipeline import read_split
    from dcgh_dist.train.loop import train_loop_per_worker

    quiet_data_progress()
    uri = resolve_dataset(cfg)
    scan = scan_dataset(uri, cfg.data.s3_endpoint)
    info = scan.info
    n_train = scan.split_counts["train"]
    spe = steps_per_epoch(n_train, cfg.data.batch_size, cfg.train.num_workers)
    if spe < 1:
        raise ValueError(
            f"{uri}: {n_train} train rows are too few for batch size {cfg.data.batch_size} x "
            f"{cfg.train.num_workers} worker(s); lower data.batch_size"
        )
    logger.info(
        "dataset %s: %s; %d steps/epoch x %d epochs", uri, scan.split_counts, spe, cfg.train.epochs
    )

    datasets = {
        "train": read_split(uri, info, cfg, ["train"], augment=cfg.data.augment, shuffle_files=True,
                            files=scan.files),
    }
    has_val = scan.split_counts["val"] > 1 and cfg.train.select_on_val
    if has_val:
        datasets["val"] = read_split(uri, info, cfg, ["val"], files=scan.files)

    output_dir = os.path.abspath(cfg.train.output_dir)
    os.makedirs(output_dir, exist_ok=True)
    storage = cfg.train.storage_path or os.path.join(output_dir, "ray_results")
    name = "train"
    run_dir = f"{storage.rstrip('/')}/{name}"
    run_config = ray.train.RunConfig(
        name=name,
        # with an explicit filesystem Ray wants the bare "bucket/prefix" path, not the URI
        storage_path=_storage_path(storage),
        storage_filesystem=_storage_filesystem(storage, cfg),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=cfg.train.keep_checkpoints,
            checkpoint_score_attribute="val_map" if has_val else "global_step",
            checkpoint_score_order="max",
        ),
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
    )
    resume_ckpt = None
    if resume:
        resume_ckpt = latest_checkpoint(run_dir, cfg)
        if resume_ckpt is None:
            logger.warning("--resume: no checkpoint under %s; starting fresh", run_dir)
        else:
            logger.info("--resume: continuing from %s", resume_ckpt.path)
    else:
        _clear_run_dir(run_dir, cfg)  # a fresh run must not pick up an old run's checkpoints

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "dataset_info": info.to_json(),
            "steps_per_epoch": spe,
            "has_val": has_val,
            "val_rows": scan.split_counts["val"],
            # Ray Train v2 restores the latest checkpoint of a run directory it finds by itself;
            # this is the fallback for a directory without its snapshot (e.g. copied elsewhere).
            "resume_checkpoint": resume_ckpt,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **(
                {"GPU": cfg.train.gpus_per_worker} if cfg.train.use_gpu else {})},
        ),
        run_config=run_config,
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}") from result.error

    chosen = _select_checkpoint(result, has_val)
    dest = os.path.join(output_dir, "checkpoint")
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    with chosen.as_directory() as d:
        # The exported checkpoint is what evaluation, encoding and serving need: weights,
        # proxies, meta. Optimizer and DeepSpeed state stay in the run directory.
        shutil.copytree(d, dest, ignore=shutil.ignore_patterns("train_state.pt", "deepspeed"))
    from dcgh_dist.train.checkpoint import read_meta

    meta = read_meta(dest)
    history = meta.history
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            history = read_meta(d).history
    return TrainOutcome(dest, history, meta.epoch, uri, scan)


def _select_checkpoint(result, has_val: bool):
    """Best end-of-epoch checkpoint by val mAP (mid-epoch ones carry NaN), else the latest."""
    import math

    if has_val:
        scored = [(m.get("val_map"), c) for c, m in (result.best_checkpoints or [])]
        scored = [(v, c) for v, c in scored if isinstance(v, (int, float)) and not math.isnan(v)]
        if scored:
            return max(scored, key=lambda vc: vc[0])[1]
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return result.checkpoint


def _storage_filesystem(storage: str, cfg: Config):
    """pyarrow filesystem for an s3:// storage path (honours data.s3_endpoint), else None."""
    if storage.startswith("s3://"):
        from dcgh_dist.data.format import resolve_filesystem

        return resolve_filesystem(storage, cfg.data.s3_endpoint)[0]
    return None


def _storage_path(uri: str) -> str:
    return uri[len("s3://"):] if uri.startswith("s3://") else uri


def _clear_run_dir(run_dir: str, cfg: Config) -> None:
    import pyarrow.fs as pafs

    fs = _storage_filesystem(run_dir, cfg) or pafs.LocalFileSystem()
    path = _storage_path(run_dir)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def latest_checkpoint(run_dir: str, cfg: Config):
    """The newest checkpoint (by optimizer step) of an earlier run under ``run_dir``."""
    import pyarrow.fs as pafs
    import ray.train

    from dcgh_dist.train.checkpoint import CheckpointMeta

    fs = _storage_filesystem(run_dir, cfg) or pafs.LocalFileSystem()
    base = _storage_path(run_dir)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return None
    found = []
    for entry in fs.get_file_info(pafs.FileSelector(base, recursive=False)):
        meta_path = f"{entry.path}/meta.json"
        if entry.type == pafs.FileType.Directory and fs.get_file_info(meta_path).type == pafs.FileType.File:
            with fs.open_input_stream(meta_path) as f:
                meta = CheckpointMeta.from_json(f.read().decode(), where=meta_path)
            found.append(((meta.epoch, meta.step_in_epoch, meta.global_step), entry.path))
    if not found:
        return None
    return ray.train.Checkpoint(path=max(found)[1], filesystem=fs)
