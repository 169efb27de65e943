"""``train_loop_per_worker``: what every Ray Train worker runs.

The loop is the only place that knows about Ray Train; the model and the loss do not. Per step:
forward both towers, gather codes and labels from all workers (``dcgh_dist.distributed``),
compute the pure DCGH loss with global normalisation, backward, clip, step the model optimizer
and the proxies' own SGD. Rank 0 evaluates on ``val`` (never ``query``) after each epoch and
reports a checkpoint; Ray keeps the best by ``val_map``.
"""

from __future__ import annotations

import json
import logging
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
from dcgh_dist.train.checkpoint import (
    CheckpointMeta,
    architecture_of,
    load_state,
    read_meta,
    save_checkpoint,
)
from dcgh_dist.train.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def encode_batches(model, batches, device) -> dict[str, np.ndarray]:
    """Relaxed codes + labels of every batch (eval mode), concatenated."""
    model.eval()
    out: dict[str, list] = {"image_codes": [], "text_codes": [], "labels": []}
    for b in batches:
        b = {k: v.to(device) for k, v in b.items() if isinstance(v, torch.Tensor)}
        codes = model(b)
        out["image_codes"].append(codes["image_codes"].float().cpu().numpy())
        out["text_codes"].append(codes["text_codes"].float().cpu().numpy())
        out["labels"].append(b["labels"].cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros((0, 0)) for k, v in out.items()}


def validation_metrics(codes: dict[str, np.ndarray]) -> dict[str, float]:
    """val-vs-val mAP (both directions): cheap, and keeps model selection off the query split."""
    from dcgh_dist.metrics import mean_average_precision

    if len(codes["labels"]) < 2:
        return {}
    i2t = mean_average_precision(codes["image_codes"], codes["text_codes"], codes["labels"], codes["labels"])
    t2i = mean_average_precision(codes["text_codes"], codes["image_codes"], codes["labels"], codes["labels"])
    return {"val_map_i2t": i2t, "val_map_t2i": t2i, "val_map": (i2t + t2i) / 2}


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = Config.from_dict(loop_config["config"])
    info = DatasetInfo.from_json(loop_config["dataset_info"])
    steps_per_epoch: int = loop_config["steps_per_epoch"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    total_steps = steps_per_epoch * cfg.train.epochs

    torch.manual_seed(cfg.train.seed)  # same init on every worker, and for the untrained baseline
    model = build_model(
        cfg.model, image_feature_dim=info.image_feature_dim, text_feature_dim=info.text_feature_dim
    )
    arch = architecture_of(model)
    proxies = ClassProxies(info.num_classes, cfg.model.bits, cfg.loss.proxy_seed)
    optimizer = build_optimizer(model, cfg.optim, world)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    proxy_opt = proxies.make_optimizer(cfg.loss)

    start_epoch, global_step, history = 0, 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            meta = read_meta(d)
            model.load_state_dict(load_state(d, "model.pt"))
            proxies.load_state_dict(load_state(d, "proxies.pt"))
            ts = load_state(d, "train_state.pt")
            optimizer.load_state_dict(ts["optimizer"])
            scheduler.load_state_dict(ts["scheduler"])
            proxy_opt.load_state_dict(ts["proxy_optimizer"])
            start_epoch, global_step, history = meta.epoch, meta.global_step, meta.history
        if rank == 0:
            logger.info("resumed from epoch %d, step %d", start_epoch, global_step)

    model = ray.train.torch.prepare_model(model)  # DDP when world > 1; moves to the device
    proxies.to(device)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if rank == 0 and loop_config.get("has_val") else None
    params = [p for g in optimizer.param_groups for p in g["params"]]

    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        t0, n_pairs, sums, n_steps = time.perf_counter(), 0, {}, 0
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.data.batch_size,
            drop_last=True,  # equal batches on every worker keep the collectives in lock-step
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.train.seed * 1000 + epoch + rank * 7919 if cfg.data.shuffle_buffer else None,
        )
        for step_in_epoch, batch in enumerate(batches):
            if step_in_epoch >= steps_per_epoch:
                break  # uneven shards: every worker runs exactly steps_per_epoch steps
            batch = {k: v.to(device) for k, v in batch.items()}
            codes = model(batch)
            img, txt, labels = codes["image_codes"], codes["text_codes"], batch["labels"]
            loss, logged = distributed_dcgh_loss(img, txt, labels, proxies(), cfg.loss)
            optimizer.zero_grad(set_to_none=True)
            proxy_opt.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_grads(proxies.parameters())
            if cfg.optim.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            proxy_opt.step()
            global_step += 1
            n_steps += 1
            n_pairs += img.shape[0] * world
            for k, v in logged.items():
                sums[k] = sums.get(k, 0.0) + v
            if rank == 0 and (global_step % cfg.train.log_every == 0 or step_in_epoch == 0):
                elapsed = time.perf_counter() - t0
                logger.info(
                    "epoch %d/%d step %d/%d loss %.4f (proxy %.4f pos %.4f neg %.4f var %.4f) %.1f pairs/s",
                    epoch + 1, cfg.train.epochs, step_in_epoch + 1, steps_per_epoch, logged["total"],
                    logged["proxy"], logged["pairwise_pos"], logged["pairwise_neg"], logged["variance"],
                    n_pairs / max(elapsed, 1e-9),
                )
        elapsed = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "global_step": global_step,
            "pairs_per_s": n_pairs / max(elapsed, 1e-9),
            "epoch_seconds": elapsed,
            "lr_heads": scheduler.get_last_lr()[-1],
            **{f"loss_{k}": v / max(n_steps, 1) for k, v in sums.items()},
        }
        if rank == 0:
            if val_shard is not None:
                metrics.update(validation_metrics(
                    encode_batches(_unwrap(model), val_shard.iter_torch_batches(batch_size=256), device)
                ))
            history.append(metrics)
            logger.info("epoch %d done: %s", epoch + 1, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
            with tempfile.TemporaryDirectory() as d:
                meta = CheckpointMeta(cfg, info, epoch + 1, global_step, metrics, history, architecture=arch)
                save_checkpoint(
                    d,
                    {k: v.cpu() for k, v in _unwrap(model).state_dict().items()},
                    {k: v.cpu() for k, v in proxies.state_dict().items()},
                    meta,
                    {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "proxy_optimizer": proxy_opt.state_dict()},
                )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics, checkpoint=None)

