"""``train_loop_per_worker``: what every Ray Train worker runs.

The loop is the only place that knows about Ray Train; the model and the loss do not. Per
micro-batch: forward both towers through the engine (DDP or DeepSpeed), gather codes and labels
from all workers (``dcgh_dist.distributed``), compute the pure DCGH loss with global
normalisation, backward, and at accumulation boundaries step the engine (clip, AdamW, schedule)
and the proxies' own SGD. Rank 0 evaluates on ``val`` (never ``query``) after each epoch.

Checkpoints are reported after every epoch and, with ``train.checkpoint_every_steps``, inside
epochs too. They record the data position (epoch and micro-step within it); a resumed run
(``--resume`` or a Ray Train restart after a worker died) continues from there, so the number of
steps, the schedule and the epoch count are exactly those of an uninterrupted run. Inside the
interrupted epoch the remaining steps draw from a fresh shuffle of that epoch's data.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from typing import Any

import numpy as np
import torch

from dcgh_dist.config import Config
from dcgh_dist.data.format import DatasetInfo
from dcgh_dist.distributed import all_reduce_grads, distributed_dcgh_loss
from dcgh_dist.losses import ClassProxies
from dcgh_dist.models import build_model
from dcgh_dist.models.checkpoint import (
    CheckpointMeta,
    architecture_of,
    load_state,
    read_meta,
    save_checkpoint,
)
from dcgh_dist.train.engine import build_engine

logger = logging.getLogger(__name__)


def encode_batches(model, batches) -> dict[str, np.ndarray]:
    """Relaxed codes + labels of every batch (eval mode, through the one inference path)."""
    from dcgh_dist.models.encoder import Encoder

    enc = Encoder(model)
    out: dict[str, list] = {"image_codes": [], "text_codes": [], "labels": []}
    for b in batches:
        out["image_codes"].append(enc.relaxed("image", b[model.image_key]))
        out["text_codes"].append(enc.relaxed("text", b[model.text_key]))
        out["labels"].append(b["labels"].float().cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros((0, 0)) for k, v in out.items()}


def validation_metrics(codes: dict[str, np.ndarray]) -> dict[str, float]:
    """val-vs-val mAP (both directions): cheap, and keeps model selection off the query split."""
    from dcgh_dist.metrics import mean_average_precision

    if len(codes["labels"]) < 2:
        return {}
    i2t = mean_average_precision(codes["image_codes"], codes["text_codes"], codes["labels"], codes["labels"])
    t2i = mean_average_precision(codes["text_codes"], codes["image_codes"], codes["labels"], codes["labels"])
    return {"val_map_i2t": i2t, "val_map_t2i": t2i, "val_map": (i2t + t2i) / 2}


def _setup_logging() -> None:
    pkg = logging.getLogger("dcgh_dist")
    pkg.setLevel(logging.INFO)
    if not pkg.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        pkg.addHandler(handler)


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
    model = build_model(
        cfg.model, image_feature_dim=info.image_feature_dim, text_feature_dim=info.text_feature_dim
    )
    arch = architecture_of(model)
    proxies = ClassProxies(info.num_classes, cfg.model.bits, cfg.loss.proxy_seed)
    proxy_opt = proxies.make_optimizer(cfg.loss)

    start_epoch, start_micro, global_step, history, resume_dir = 0, 0, 0, [], None
    ckpt = ray.train.get_checkpoint() or loop_config.get("resume_checkpoint")
    if ckpt:
        resume_dir = ckpt.to_directory()  # a local copy every rank can read
        meta = read_meta(resume_dir)
        model.load_state_dict(load_state(resume_dir, "model.pt"))
        proxies.load_state_dict(load_state(resume_dir, "proxies.pt"))
        start_epoch, start_micro = meta.epoch, meta.step_in_epoch
        global_step, history = meta.global_step, meta.history
        if rank == 0:
            logger.info("resuming at epoch %d, micro-step %d (optimizer step %d)",
                        start_epoch + 1, start_micro, global_step)
    # Recorded in the history of the epoch that continues from a checkpoint, so a run's record
    # shows where each restart (worker failure or --resume) picked up.
    resumed_from_step = global_step if ckpt else None

    engine = build_engine(model, cfg, total_opt_steps, world)
    proxies.to(device)
    if resume_dir:
        ts = load_state(resume_dir, "train_state.pt")
        engine.load(resume_dir, ts.get("engine"))
        proxy_opt.load_state_dict(ts["proxy_optimizer"])

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if rank == 0 and loop_config.get("has_val") else None
    # A small val set is kept in memory after its first pass instead of re-running its pipeline
    # every epoch (seconds of start-up each time); a large one streams.
    cache_val = loop_config.get("val_rows", 0) <= 4096
    val_cache: list | None = None

    def report(epoch: int, micro: int, metrics: dict[str, Any]) -> None:
        """Every rank takes part (DeepSpeed saves partitions; ZeRO-3 export gathers)."""
        weights = engine.export_state_dict()
        with tempfile.TemporaryDirectory() as d:
            engine.save_engine_state(d)
            if rank == 0:
                meta = CheckpointMeta(cfg, info, epoch=epoch, global_step=global_step,
                                      step_in_epoch=micro, metrics=metrics, history=list(history),
                                      architecture=arch)
                save_checkpoint(
                    d, weights, {k: v.cpu() for k, v in proxies.state_dict().items()}, meta,
                    {"engine": engine.state_for_checkpoint(), "proxy_optimizer": proxy_opt.state_dict()},
                )
            has_files = rank == 0 or cfg.train.engine == "deepspeed"
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if has_files else None)

    for epoch in range(start_epoch, cfg.train.epochs):
        engine.module.train()
        first = start_micro if epoch == start_epoch else 0
        t0, n_pairs, sums, n_micro = time.perf_counter(), 0, {}, 0
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.data.batch_size,
            drop_last=True,  # equal batches on every worker keep the collectives in lock-step
            local_shuffle_buffer_size=shuffle_buffer,
        )
        micro, data_wait, first_batch_wait = first, 0.0, None
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
            batch = {k: v.to(device) for k, v in batch.items()}
            codes = engine.forward(batch)
            loss, logged = distributed_dcgh_loss(
                codes["image_codes"], codes["text_codes"], batch["labels"], proxies(), cfg.loss
            )
            engine.backward(loss)
            micro += 1
            n_micro += 1
            n_pairs += batch["labels"].shape[0] * world
            for k, v in logged.items():
                sums[k] = sums.get(k, 0.0) + v
            if engine.step():  # an optimizer step happened: the proxies step with it
                scale = engine.grad_scale()  # fp16 loss scaling reached the proxies too
                if scale != 1.0:
                    for p in proxies.parameters():
                        if p.grad is not None:
                            p.grad.div_(scale)
                all_reduce_grads(proxies.parameters())
                proxy_opt.step()
                proxy_opt.zero_grad(set_to_none=True)
                global_step += 1
                if rank == 0 and (global_step % cfg.train.log_every == 0 or micro == first + accum):
                    logger.info(
                        "epoch %d/%d step %d/%d loss %.4f (proxy %.4f pos %.4f neg %.4f var %.4f) lr %.2e %.1f pairs/s",
                        epoch + 1, cfg.train.epochs, micro, steps_per_epoch, logged["total"],
                        logged["proxy"], logged["pairwise_pos"], logged["pairwise_neg"],
                        logged["variance"], engine.lr(), n_pairs / max(time.perf_counter() - t0, 1e-9),
                    )
                every = cfg.train.checkpoint_every_steps
                if every and global_step % every == 0 and micro < steps_per_epoch:
                    # val_map NaN: Ray keeps it while it is the latest, never ranks it "best"
                    report(epoch, micro, {"epoch": epoch, "global_step": global_step, "val_map": math.nan})
        elapsed = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "global_step": global_step,
            "pairs_per_s": n_pairs / max(elapsed, 1e-9),
            "epoch_seconds": elapsed,
            "data_wait_share": data_wait / max(elapsed, 1e-9),  # this worker's (rank 0's) share
            "first_batch_seconds": first_batch_wait or 0.0,
            "lr_heads": engine.lr(),
            **{f"loss_{k}": v / max(n_micro, 1) for k, v in sums.items()},
        }
        if resumed_from_step is not None:
            metrics["resumed_from_step"], resumed_from_step = resumed_from_step, None
        if rank == 0 and val_shard is not None:
            val_batches = val_cache if val_cache is not None else val_shard.iter_torch_batches(batch_size=256)
            if cache_val and val_cache is None:
                val_batches = val_cache = list(val_batches)
            metrics.update(validation_metrics(encode_batches(engine.module, val_batches)))
        if rank == 0:
            history.append(metrics)
            logger.info("epoch %d done: %s", epoch + 1, json.dumps(
                {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
        report(epoch + 1, 0, metrics)
