"""``train_loop_per_worker``: what every Ray Train worker runs.

The loop is the only place that knows about Ray Train; the models and the losses do not. Per
micro-batch: forward through the engine (DDP or DeepSpeed), the method's loss with global
normalisation (``train/objectives.py``: DCGH, DAPH stage 1 or 2, each gathering what it needs
from all workers through ``dcgh_dist.distributed``), backward, and at accumulation boundaries
step the engine (clip, AdamW, schedule) and the objective's own state (DCGH's proxies and their
SGD). Rank 0 evaluates on ``val`` (never ``query``) after each epoch and decides, from the
history, whether val mAP has stopped improving (``train.patience``); every rank stops together.

The training split either streams from Ray Data every epoch or, when it is small, comes from the
object store (``data.cache_bytes``): then each epoch is a fresh global permutation, sharded so
that N workers see exactly the global batches of one process.

Checkpoints are reported after every epoch and, with ``train.checkpoint_every_steps``, inside
epochs too. They record the data position (epoch and micro-step within it); a resumed run
(``--resume`` or a Ray Train restart after a worker died) continues from there, so the number of
steps, the schedule and the epoch count are exactly those of an uninterrupted run. Inside the
interrupted epoch a streamed split draws the remaining steps from a fresh shuffle of that epoch's
data; a cached one continues with the very rows it would have seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from typing import Any, Iterator

import numpy as np
import torch

from dcgh_dist.config import Config
from dcgh_dist.data.format import DatasetInfo
from dcgh_dist.metrics import validation_metrics
from dcgh_dist.models.checkpoint import (
    CheckpointMeta,
    architecture_of,
    load_state,
    read_meta,
    save_checkpoint,
)
from dcgh_dist.train.engine import build_engine
from dcgh_dist.train.objectives import build_objective

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def checkpoint_files(ckpt) -> Iterator[str | None]:
    """The directory this worker reads a checkpoint's files from; ``None`` for no checkpoint.

    A checkpoint on a filesystem the worker mounts is read where it is: nothing is copied. A
    remote one (S3) is downloaded into a directory of this worker's own, removed afterwards.
    Never Ray's ``Checkpoint.to_directory()`` without a path: every worker of a node shares
    that directory, and a worker that takes its lock after another's download has finished
    downloads again, rewriting ``model.pt`` while the other reads it (a truncated zip on
    resume, seen with two DeepSpeed workers).
    """
    if ckpt is None:
        yield None
        return
    import pyarrow.fs

    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
        yield ckpt.path
        return
    with tempfile.TemporaryDirectory(prefix="dcgh-resume-") as d:
        yield ckpt.to_directory(d)


def encode_batches(model, batches) -> dict[int, dict[str, np.ndarray]]:
    """``{bits: relaxed codes + labels}`` of every batch at each of the model's code lengths (eval
    mode, through the one inference path; one pass of the towers serves every length)."""
    from dcgh_dist.models.encoder import Encoder

    lengths = getattr(model, "lengths", (model.bits,))
    enc = Encoder(model)
    parts: dict[int, dict[str, list]] = {k: {"image_codes": [], "text_codes": []} for k in lengths}
    labels = []
    for b in batches:
        for m in ("image", "text"):
            for k, codes in enc.relaxed_at(m, b[enc.key(m)], lengths).items():
                parts[k][f"{m}_codes"].append(codes)
        labels.append(b["labels"].float().cpu().numpy())

    def cat(v: list) -> np.ndarray:
        return np.concatenate(v) if v else np.zeros((0, 0))

    return {k: {**{name: cat(v) for name, v in p.items()}, "labels": cat(labels)} for k, p in parts.items()}


def _setup_logging() -> None:
    pkg = logging.getLogger("dcgh_dist")
    pkg.setLevel(logging.INFO)
    if not pkg.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        pkg.addHandler(handler)


def worker_threads(configured: int | None, workers_on_node: int) -> int:
    """torch threads for one CPU training worker: ``configured``, else the node's cores
    (``ray_session.node_cores``) divided among the workers on it."""
    if configured is not None:
        if configured < 1:
            raise ValueError(f"train.torch_threads must be >= 1 (or null for automatic), got {configured}")
        return configured
    from dcgh_dist.ray_session import node_cores

    return max(1, node_cores() // max(1, workers_on_node))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    _setup_logging()
    cfg = Config.from_dict(loop_config["config"])
    info = DatasetInfo.from_json(loop_config["dataset_info"])
    steps_per_epoch: int = loop_config["steps_per_epoch"]  # micro-batches per worker per epoch
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(worker_threads(cfg.train.torch_threads, ctx.get_local_world_size()))
        if rank == 0:
            logger.info("%d torch threads per worker (%d worker(s) on this node)",
                        torch.get_num_threads(), ctx.get_local_world_size())
    accum = cfg.train.grad_accum_steps
    total_opt_steps = (steps_per_epoch // accum) * cfg.train.epochs
    # Ray Data yields the first batch only once ~1.5 local shuffle buffers are filled, so a buffer
    # as large as a worker's shard would make every epoch preprocess its whole shard before the
    # first step, with no overlap of data and compute. Capped at a quarter of the shard, never
    # under one batch; the file order is re-shuffled every epoch as well.
    shard_rows = steps_per_epoch * cfg.data.batch_size
    shuffle_buffer = (max(cfg.data.batch_size, min(cfg.data.shuffle_buffer, shard_rows // 4))
                      if cfg.data.shuffle_buffer else None)
    if rank == 0 and shuffle_buffer is not None and shuffle_buffer < cfg.data.shuffle_buffer:
        logger.info("local shuffle buffer %d rows (data.shuffle_buffer=%d capped at a quarter of "
                    "this worker's %d-row shard)", shuffle_buffer, cfg.data.shuffle_buffer, shard_rows)

    torch.manual_seed(cfg.train.seed)  # same init on every worker, and for the untrained baseline
    anchors = loop_config.get("anchors")
    if anchors is not None:
        import ray

        anchors = ray.get(anchors)  # DAPH stage 2: the frozen stage-1 codes, zero-copy
    objective = build_objective(loop_config.get("objective", "dcgh"), cfg, info, anchors)
    model = objective.build_model()
    arch = architecture_of(model)

    start_epoch, start_micro, global_step, history = 0, 0, 0, []
    ckpt = ray.train.get_checkpoint() or loop_config.get("resume_checkpoint")
    with checkpoint_files(ckpt) as resume_dir:
        if resume_dir:
            meta = read_meta(resume_dir)
            model.load_state_dict(load_state(resume_dir, "model.pt"))
            start_epoch, start_micro = meta.epoch, meta.step_in_epoch
            global_step, history = meta.global_step, meta.history
            if rank == 0:
                logger.info("resuming at epoch %d, micro-step %d (optimizer step %d)",
                            start_epoch + 1, start_micro, global_step)
        engine = build_engine(model, cfg, total_opt_steps, world)
        objective.to(device)
        if resume_dir:
            ts = load_state(resume_dir, "train_state.pt")
            engine.load(resume_dir, ts.get("engine"))
            objective.load(load_state(resume_dir, "proxies.pt"), ts)
    # Recorded in the history of the epoch that continues from a checkpoint, so a run's record
    # shows where each restart (worker failure or --resume) picked up.
    resumed_from_step = global_step if ckpt else None

    cached = loop_config.get("cached")
    has_val = loop_config.get("has_val")
    if cached:
        import ray

        train_rows = ray.get(cached["train"])  # zero-copy views into the node's object store
        train_shard = None
        val_cache = (list(array_batches(ray.get(cached["val"]), 256)) if rank == 0 and has_val else None)
        val_shard = None
    else:
        train_shard = ray.train.get_dataset_shard("train")
        val_shard = ray.train.get_dataset_shard("val") if rank == 0 and has_val else None
        val_cache = None
    # A small val set is kept in memory after its first pass instead of re-running its pipeline
    # every epoch (seconds of start-up each time); a large one streams.
    cache_val = loop_config.get("val_rows", 0) <= 4096

    def report(epoch: int, micro: int, metrics: dict[str, Any]) -> None:
        """Every rank takes part (DeepSpeed saves partitions; ZeRO-3 export gathers)."""
        weights = engine.export_state_dict()
        with tempfile.TemporaryDirectory() as d:
            engine.save_engine_state(d)
            if rank == 0:
                meta = CheckpointMeta(cfg, info, epoch=epoch, global_step=global_step,
                                      step_in_epoch=micro, metrics=metrics, history=list(history),
                                      architecture=arch)
                save_checkpoint(d, weights, objective.extra_state(), meta,
                                {"engine": engine.state_for_checkpoint(), **objective.extra_train_state()})
            has_files = rank == 0 or cfg.train.engine == "deepspeed"
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if has_files else None)

    last_epoch_end = None
    for epoch in range(start_epoch, cfg.train.epochs):
        engine.module.train()
        first = start_micro if epoch == start_epoch else 0
        t0, n_pairs, sums, n_micro = time.perf_counter(), 0, {}, 0
        if train_shard is None:
            batches = epoch_batches(train_rows, seed=cfg.train.seed, epoch=epoch, rank=rank, world=world,
                                    batch_size=cfg.data.batch_size, steps=steps_per_epoch, first=first)
        else:
            batches = train_shard.iter_torch_batches(
                batch_size=cfg.data.batch_size,
                drop_last=True,  # equal batches on every worker keep the collectives in lock-step
                local_shuffle_buffer_size=shuffle_buffer,
            )
        micro, data_wait, first_batch_wait = first, 0.0, None
        split: dict[str, float] = {}
        batch_iter = iter(batches)
        while True:
            # Time blocked on the data pipeline, apart from compute: the number that says whether
            # Ray Data keeps up (target: a few percent of the step time). The first batch's wait
            # is the epoch's pipeline start-up, reported apart since it does not grow with the data.
            t_wait = time.perf_counter()
            batch = next(batch_iter, None)
            data_wait += time.perf_counter() - t_wait
            if first_batch_wait is None:
                first_batch_wait = data_wait
            if batch is None:
                break
            if micro >= steps_per_epoch:
                break  # uneven shards: every worker runs exactly steps_per_epoch micro-steps
            # Where the step's time goes, per epoch (host clock: exact on CPU; on a GPU the
            # kernels are asynchronous and the time lands where the next sync is).
            t = time.perf_counter()
            batch = {k: v.to(device) for k, v in batch.items()}
            t = _lap(split, "h2d", t)
            codes = engine.forward(batch)
            t = _lap(split, "forward", t)
            loss, logged = objective.loss(codes, batch)  # gathers every worker's codes
            t = _lap(split, "loss_and_gather", t)
            engine.backward(loss)
            t = _lap(split, "backward", t)
            micro += 1
            n_micro += 1
            n_pairs += batch["labels"].shape[0] * world
            for k, v in logged.items():
                sums[k] = sums.get(k, 0.0) + v
            stepped = engine.step()
            if stepped:  # an optimizer step happened: the objective's own state steps with it
                objective.after_step(engine.grad_scale())
            t = _lap(split, "optimizer", t)
            if stepped:
                global_step += 1
                if rank == 0 and (global_step % cfg.train.log_every == 0 or micro == first + accum):
                    logger.info(
                        "epoch %d/%d step %d/%d loss %.4f (%s) lr %.2e %.1f pairs/s",
                        epoch + 1, cfg.train.epochs, micro, steps_per_epoch, logged["total"],
                        " ".join(f"{k} {logged[k]:.4f}" for k in objective.log_terms if k in logged),
                        engine.lr(), n_pairs / max(time.perf_counter() - t0, 1e-9),
                    )
                every = cfg.train.checkpoint_every_steps
                if every and global_step % every == 0 and micro < steps_per_epoch:
                    # val_map NaN: Ray keeps it while it is the latest, never ranks it "best"
                    report(epoch, micro, {"epoch": epoch, "global_step": global_step, "val_map": math.nan})
        now = time.perf_counter()
        elapsed = now - t0
        # What a user waits per epoch: also the previous epoch's validation and report
        wall, last_epoch_end = now - (last_epoch_end if last_epoch_end is not None else t0), now
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "global_step": global_step,
            "pairs_per_s": n_pairs / max(elapsed, 1e-9),
            "epoch_seconds": elapsed,
            "epoch_wall_seconds": wall,
            "data_wait_share": data_wait / max(elapsed, 1e-9),  # this worker's (rank 0's) share
            "first_batch_seconds": first_batch_wait or 0.0,
            "lr_heads": engine.lr(),
            "torch_threads": torch.get_num_threads(),
            **{f"loss_{k}": v / max(n_micro, 1) for k, v in sums.items()},
            **{f"seconds_{k}": v for k, v in split.items()},
        }
        if resumed_from_step is not None:
            metrics["resumed_from_step"], resumed_from_step = resumed_from_step, None
        if rank == 0 and (val_shard is not None or val_cache is not None):
            val_batches = val_cache if val_cache is not None else val_shard.iter_torch_batches(batch_size=256)
            if cache_val and val_cache is None:
                val_batches = val_cache = list(val_batches)
            t_val = time.perf_counter()
            metrics.update(validate(engine.module, val_batches))
            metrics["seconds_validation"] = time.perf_counter() - t_val
        stop = False
        if rank == 0:
            history.append(metrics)
            stop = patience_exhausted(history, cfg.train.patience) if has_val else False
            if stop:
                metrics["stopped_early"] = True
            logger.info("epoch %d done: %s", epoch + 1, json.dumps(
                {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
        stop = _broadcast_flag(stop, device) if world > 1 else stop
        report(epoch + 1, 0, metrics)
        if stop:
            best = best_val_epoch(history)
            if rank == 0:
                logger.info("val mAP has not improved for %d evaluations (best %.4f after epoch %d): "
                            "stopping after epoch %d of at most %d", cfg.train.patience,
                            history[best - 1]["val_map"], best, epoch + 1, cfg.train.epochs)
            break


def _lap(split: dict[str, float], name: str, since: float) -> float:
    now = time.perf_counter()
    split[name] = split.get(name, 0.0) + now - since
    return now


def validate(model, batches) -> dict[str, float]:
    """val-vs-val mAP; with several code lengths per length (``val_map@K``), and ``val_map`` (what
    selection and early stopping watch) their mean, so one checkpoint serves every length."""
    by_length = encode_batches(model, batches)
    if len(by_length) == 1:
        return validation_metrics(next(iter(by_length.values())))
    out = {f"{name}@{k}": v for k, codes in by_length.items() for name, v in validation_metrics(codes).items()}
    out["val_map"] = float(np.mean([out[f"val_map@{k}"] for k in by_length]))
    return out


def best_val_epoch(history: list[dict[str, Any]]) -> int:
    """The (1-based) epoch of the best val mAP; the earliest wins a tie (a tie is no improvement)."""
    scored = [(h["val_map"], -h["epoch"]) for h in history if isinstance(h.get("val_map"), float)
              and not math.isnan(h["val_map"])]
    return -max(scored)[1] if scored else 0


def patience_exhausted(history: list[dict[str, Any]], patience: int) -> bool:
    """True once the last ``patience`` evaluations brought no val mAP above the best before them."""
    if patience <= 0:
        return False
    best = best_val_epoch(history)
    return bool(best) and history[-1]["epoch"] - best >= patience


def _broadcast_flag(flag: bool, device) -> bool:
    """Rank 0's decision on every rank, so all workers leave the loop after the same epoch."""
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def array_batches(rows: dict[str, np.ndarray], batch_size: int):
    """Consecutive batches of in-memory columns as tensors (a cached val split)."""
    n = len(rows["labels"])
    for i in range(0, n, batch_size):
        yield {k: torch.from_numpy(np.ascontiguousarray(v[i:i + batch_size])) for k, v in rows.items()}


def epoch_batches(rows: dict[str, np.ndarray], *, seed: int, epoch: int, rank: int, world: int,
                  batch_size: int, steps: int, first: int = 0):
    """This worker's batches of one epoch over a split held in memory.

    Every epoch draws a fresh permutation of all rows (the same on every worker: seeded by the run
    seed and the epoch); global batch t is rows ``perm[t*W*B:(t+1)*W*B]`` and worker r takes the
    r-th B of them. So N workers x B see exactly the global batches of one process x N*B, and a
    resumed epoch (``first`` micro-steps done) continues with the very rows it would have seen.
    """
    n = len(rows["labels"])
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per_step = world * batch_size
    for step in range(first, steps):
        idx = perm[step * per_step + rank * batch_size: step * per_step + (rank + 1) * batch_size]
        yield {k: torch.from_numpy(v[idx]) for k, v in rows.items()}
