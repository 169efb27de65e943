"""Driver side of training: resolve the dataset, start/join Ray, run a TorchTrainer, collect.

``run_training(cfg)`` is what ``jobs/train.py`` calls; it returns the path of the selected
checkpoint and the per-epoch history. The same call works on a laptop (a local Ray cluster is
started, bound to 127.0.0.1) and inside ``ray job submit`` on a real cluster (it joins it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from dcgh_dist.config import Config
from dcgh_dist.data.format import DATABASE_SPLITS, DatasetScan, scan_dataset
from dcgh_dist.data.pipeline import collect, read_split
from dcgh_dist.data.presets import resolve_dataset
from dcgh_dist.models import resolve_family
from dcgh_dist.models.checkpoint import CheckpointMeta, read_meta
from dcgh_dist.models.inputs import image_size_for, preprocessor_for
from dcgh_dist.ray_session import env_default, quiet_progress
from dcgh_dist.storage import (child_uri, display, exists, is_remote, publish_dir, put_tree, read_text,
                               resolve_filesystem, write_text_atomic)
from dcgh_dist.train.loop import train_loop_per_worker
from dcgh_dist.train.process_group import NodeBoundTorchConfig

logger = logging.getLogger(__name__)


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


@dataclass
class RunPlan:
    """Everything about a run that can be checked before Ray starts."""

    cfg: Config  # the config the run uses: the user's, with model.family resolved against the data
    uri: str
    scan: DatasetScan
    steps_per_epoch: int
    has_val: bool
    output_dir: str
    storage: str
    run_name: str
    resume_ckpt: Any = None  # ray.train.Checkpoint of the run to continue
    cache_train: bool = False  # keep the preprocessed train (and val) split in the object store
    cache_reason: str = ""

    @property
    def run_dir(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.run_name}"


def plan_run(cfg: Config, *, resume: bool = False) -> RunPlan:
    """Resolve and validate the dataset, choose the run directory, check a resume: every mistake
    a user can make surfaces here, in seconds, not after a Ray start or an hour of training."""
    uri = resolve_dataset(cfg.data)
    scan = scan_dataset(uri, cfg.data.s3_endpoint)
    try:
        cfg = dataclasses.replace(cfg, model=resolve_family(cfg.model, scan.info))
    except ValueError as e:
        raise ValueError(f"{uri}: {e}") from e
    n_train = scan.split_counts["train"]
    spe = steps_per_epoch(n_train, cfg.data.batch_size, cfg.train.num_workers)
    if spe < 1:
        raise ValueError(
            f"{uri}: {n_train} train rows are too few for batch size {cfg.data.batch_size} x "
            f"{cfg.train.num_workers} worker(s); lower data.batch_size"
        )
    n_db = sum(scan.split_counts[s] for s in DATABASE_SPLITS)
    if scan.split_counts["query"] == 0 or n_db == 0:
        raise ValueError(
            f"{uri}: the job evaluates queries against a retrieval database, but the dataset has "
            f"{scan.split_counts['query']} 'query' rows and {n_db} database rows (splits "
            f"{scan.split_counts}); see docs/DATASET_FORMAT.md"
        )
    has_val = scan.split_counts["val"] > 1 and cfg.train.select_on_val
    # A local directory or an s3:// prefix: every output goes through dcgh_dist.storage.
    output_dir = child_uri(cfg.train.output_dir)
    storage = cfg.train.storage_path or child_uri(output_dir, "ray_results")
    name = choose_run_name(cfg, output_dir, storage, resume=resume, dataset=uri)
    if is_remote(output_dir):
        check_remote_output(output_dir, name, resume, cfg.data.s3_endpoint)
    plan = RunPlan(cfg, uri, scan, spe, has_val, output_dir, storage, name)
    plan.cache_train, plan.cache_reason = cache_decision(cfg, scan.info, n_train + scan.split_counts["val"])
    if resume:
        plan.resume_ckpt = latest_checkpoint(plan.run_dir, cfg)
        if plan.resume_ckpt is None:
            logger.warning("--resume: no checkpoint under %s; starting fresh", plan.run_dir)
        else:
            check_resumable(plan.resume_ckpt, cfg, scan.info)
            logger.info("--resume: continuing from %s", plan.resume_ckpt.path)
    elif _exists(plan.run_dir, cfg):
        # Ray Train would silently continue whatever it finds there; and deleting it could
        # destroy another run's checkpoints or the user's files. Neither: refuse.
        raise ValueError(
            f"run directory {plan.run_dir} already exists: pass --resume to continue that run, or "
            "choose another train.run_name (leave it unset for a new name per run)"
        )
    return plan


def preprocessed_row_bytes(cfg: Config, info) -> int:
    """Bytes one preprocessed row takes in memory (what BatchPreprocessor emits)."""
    image = (info.image_feature_dim or 0) * 4 if info.image_column == "image_features" else 3 * image_size_for(cfg) ** 2 * 4
    text = (info.text_feature_dim or 0) * 4 if info.text_column == "text_features" else cfg.model.context_length * 8
    return 8 + 4 * info.num_classes + image + text


def cache_decision(cfg: Config, info, rows: int) -> tuple[bool, str]:
    """Whether the train (and val) rows are read once into the object store, and why (logged).

    Streaming pays the pipeline's start-up (a second or more) every epoch, which dominates the
    epochs of a small dataset; a cached split pays it once. Per-epoch image augmentation needs
    the pipeline every epoch, and a split over the budget must stream."""
    need = rows * preprocessed_row_bytes(cfg, info)
    size = f"{need / 2**20:.1f} MiB preprocessed"
    if cfg.data.cache_bytes == 0:
        return False, f"streaming: data.cache_bytes=0 ({size})"
    if info.image_column == "image" and cfg.data.augment:
        return False, f"streaming: images are augmented afresh every epoch (data.augment=true; {size})"
    if need > cfg.data.cache_bytes:
        return False, f"streaming: {size} > data.cache_bytes={cfg.data.cache_bytes / 2**20:.0f} MiB"
    return True, f"cached in the object store: {size} <= data.cache_bytes={cfg.data.cache_bytes / 2**20:.0f} MiB"


def check_resumable(ckpt, cfg: Config, info) -> None:
    """The checkpoint must fit the model this config builds: name what changed, not torch's
    'size mismatch' from inside a worker."""
    fs = ckpt.filesystem or pafs.LocalFileSystem()
    with fs.open_input_stream(f"{ckpt.path}/meta.json") as f:
        meta = CheckpointMeta.from_json(f.read().decode(), where=f"{ckpt.path}/meta.json")
    was, now = meta.config.model, cfg.model
    changed = [f"model.{k}: {getattr(was, k)!r} -> {getattr(now, k)!r}"
               for k in was.__dataclass_fields__ if k != "pretrained" and getattr(was, k) != getattr(now, k)]
    if meta.dataset_info.num_classes != info.num_classes:
        changed.append(f"dataset classes: {meta.dataset_info.num_classes} -> {info.num_classes}")
    if changed:
        raise ValueError(
            f"--resume: the checkpoint at {ckpt.path} was trained with another model ({'; '.join(changed)}); "
            "resume with the settings it was trained with, or start a new run without --resume"
        )


def run_training(cfg: Config, *, resume: bool = False, plan: RunPlan | None = None,
                 objective: str = "dcgh", anchors: Any = None) -> TrainOutcome:
    """Train with ``objective`` (``train/objectives.py``: dcgh, daph-proxy, daph-hash; the last
    with ``anchors``, an ObjectRef of DAPH's proxy codes) and export the selected checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    plan = plan or plan_run(cfg, resume=resume)
    cfg = plan.cfg
    quiet_progress()
    uri, scan, spe, has_val, storage = plan.uri, plan.scan, plan.steps_per_epoch, plan.has_val, plan.storage
    info = scan.info
    logger.info(
        "dataset %s: %s; %d steps/epoch x %d epochs; run directory %s", uri, scan.split_counts, spe,
        cfg.train.epochs, plan.run_dir,
    )

    logger.info("train split %s", plan.cache_reason)
    datasets, cached = {}, None
    plain = preprocessor_for(cfg, info)
    if plan.cache_train:
        import ray

        # One pipeline run for the whole training: the workers read these arrays zero-copy from
        # the object store and draw each epoch's order from them (train/loop.py).
        t0 = time.perf_counter()
        cached = {"train": ray.put(collect(read_split(uri, cfg, ["train"], plain, files=scan.files)))}
        if has_val:
            cached["val"] = ray.put(collect(read_split(uri, cfg, ["val"], plain, files=scan.files)))
        logger.info("read %s into the object store in %.1f s", "train and val" if has_val else "train",
                    time.perf_counter() - t0)
    else:
        datasets["train"] = read_split(uri, cfg, ["train"], preprocessor_for(cfg, info, augment=cfg.data.augment),
                                       shuffle_files=True, files=scan.files)
        if has_val:
            datasets["val"] = read_split(uri, cfg, ["val"], plain, files=scan.files)

    output_dir = plan.output_dir
    run_config = ray.train.RunConfig(
        name=plan.run_name,
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
    resume_ckpt = plan.resume_ckpt
    write_run_record(output_dir, plan.run_name, storage, cfg.data.s3_endpoint)

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
            "cached": cached,
            "objective": objective,
            "anchors": anchors,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **(
                {"GPU": cfg.train.gpus_per_worker} if cfg.train.use_gpu else {})},
        ),
        # rank 0's rendezvous store on the node's address, not on every interface
        torch_config=NodeBoundTorchConfig(),
        run_config=run_config,
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"] if "train" in datasets else []),
    )
    # Read by the controller, which Ray Train starts with the driver's RAY_TRAIN_* variables;
    # set for this fit only, and never over a value the user exported.
    with env_default(REPORT_INTERVAL_ENV, str(cfg.train.report_interval_s)):
        result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}") from result.error

    chosen = _select_checkpoint(result, has_val)
    dest = child_uri(output_dir, "checkpoint")
    with chosen.as_directory() as d:
        # The exported checkpoint is what evaluation, encoding and serving need: weights,
        # proxies, meta. Optimizer and DeepSpeed state stay in the run directory.
        export_checkpoint(d, dest, cfg.data.s3_endpoint)
    meta = read_meta(dest, cfg.data.s3_endpoint)
    history = meta.history
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            history = read_meta(d).history
    return TrainOutcome(dest, history, meta.epoch, uri, scan)


REPORT_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def _select_checkpoint(result, has_val: bool):
    """Best end-of-epoch checkpoint by val mAP (mid-epoch ones carry NaN), else the latest."""
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
        return resolve_filesystem(storage, cfg.data.s3_endpoint)[0]
    return None


def _storage_path(uri: str) -> str:
    return uri[len("s3://"):] if uri.startswith("s3://") else uri


RUN_RECORD = "run.json"


def choose_run_name(cfg: Config, output_dir: str, storage: str, *, resume: bool, dataset: str) -> str:
    """The run directory's name under ``storage``: the configured one; with ``--resume``, the one
    ``<output_dir>/run.json`` recorded for the same storage; else a new, unique one."""
    if cfg.train.run_name:
        return cfg.train.run_name
    if resume:
        record = read_run_record(output_dir, cfg.data.s3_endpoint)
        if record and record.get("storage_path") == storage:
            return record["run_name"]
        if record:
            logger.warning("--resume: %s/%s names storage %s, not %s; starting a new run",
                           output_dir, RUN_RECORD, record.get("storage_path"), storage)
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", os.path.basename(dataset.rstrip("/")) or "run").strip("-")
    return f"{base[:48] or 'run'}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def check_remote_output(output_dir: str, run_name: str, resume: bool, s3_endpoint: str | None = None) -> None:
    """An s3:// output directory that holds a finished export takes only the run that made it,
    resumed: what is published there may be being served (docs/DEPLOY.md), so another run's
    model never replaces it. (A local output directory is the user's own: a new run replaces
    its export.)"""
    fs, path = resolve_filesystem(child_uri(output_dir, "checkpoint", "meta.json"), s3_endpoint)
    if not exists(fs, path):
        return
    record = read_run_record(output_dir, s3_endpoint) or {}
    if resume and record.get("run_name") == run_name:
        return
    raise ValueError(
        f"{output_dir} already holds the checkpoint of run {record.get('run_name', '(unrecorded)')}: on S3 a "
        "published model is never replaced by another run's; give this run a new --output-dir, or continue "
        "that run with --resume"
    )


def read_run_record(output_dir: str, s3_endpoint: str | None = None) -> dict[str, Any] | None:
    fs, path = resolve_filesystem(child_uri(output_dir, RUN_RECORD), s3_endpoint)
    where = display(fs, path)
    if not exists(fs, path):
        return None
    try:
        record = json.loads(read_text(fs, path))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: unreadable ({e}); remove it to start afresh") from e
    if not isinstance(record, dict) or not isinstance(record.get("run_name"), str):
        raise ValueError(f"{where}: not a run record (no run_name)")
    return record


def write_run_record(output_dir: str, run_name: str, storage: str, s3_endpoint: str | None = None) -> None:
    record = {"run_name": run_name, "storage_path": storage, "run_dir": f"{storage.rstrip('/')}/{run_name}",
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    fs, path = resolve_filesystem(child_uri(output_dir, RUN_RECORD), s3_endpoint)
    write_text_atomic(fs, path, json.dumps(record, indent=2))


def run_directory(output_dir: str, s3_endpoint: str | None = None) -> str | None:
    """Where the run whose outputs are in ``output_dir`` keeps its Ray Train checkpoints."""
    record = read_run_record(output_dir, s3_endpoint)
    return record["run_dir"] if record else None


# Optimizer and DeepSpeed state stay in the run directory: the export is what is read later.
_NOT_EXPORTED = ("train_state.pt", "deepspeed")


def export_checkpoint(src: str, dest: str, s3_endpoint: str | None = None) -> None:
    """Copy the selected checkpoint (a local directory) to ``dest``, a local path or s3:// URI,
    so that a reader never loads a half-written one.

    Locally: into a temporary sibling, then renamed over an earlier export (a directory holding a
    dcgh-dist checkpoint's meta.json), never over other files. On S3, where a prefix cannot be
    renamed: each file is one atomic PUT and meta.json, which makes the checkpoint loadable, goes
    last (its weights are verified against meta.json's fingerprint on load anyway). Which run may
    write there is decided before training (check_remote_output).
    """
    if is_remote(dest):
        fs, base = resolve_filesystem(dest, s3_endpoint)
        with tempfile.TemporaryDirectory(prefix="dcgh-export-") as tmp:
            staged = os.path.join(tmp, "checkpoint")
            shutil.copytree(src, staged, ignore=shutil.ignore_patterns(*_NOT_EXPORTED))
            put_tree(staged, fs, base, last=("meta.json",))
        return
    if os.path.lexists(dest):
        try:
            read_meta(dest)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{dest} exists and is not a checkpoint this job exported ({e}); move it away or "
                "choose another --output-dir"
            ) from e
    publish_dir(dest, lambda staging: shutil.copytree(src, staging, dirs_exist_ok=True,
                                                      ignore=shutil.ignore_patterns(*_NOT_EXPORTED)),
                replace=True)


def _exists(run_dir: str, cfg: Config) -> bool:
    fs = _storage_filesystem(run_dir, cfg) or pafs.LocalFileSystem()
    return fs.get_file_info(_storage_path(run_dir)).type != pafs.FileType.NotFound


def latest_checkpoint(run_dir: str, cfg: Config):
    """The newest checkpoint (by optimizer step) of an earlier run under ``run_dir``."""
    import ray.train

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
