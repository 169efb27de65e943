"""Optimizers and the warmup-cosine schedule of the authors' setting."""

from __future__ import annotations

import math

import torch

from dcgh_dist.config import OptimConfig
from dcgh_dist.models import CrossModalHasher


def scaled_lr(lr: float, cfg: OptimConfig, num_workers: int) -> float:
    """Learning-rate scaling with the worker count (the global batch grows with workers)."""
    if cfg.lr_scaling == "linear":
        return lr * num_workers
    if cfg.lr_scaling == "sqrt":
        return lr * math.sqrt(num_workers)
    return lr


def param_groups(model: CrossModalHasher, cfg: OptimConfig, num_workers: int = 1) -> list[dict]:
    """Two groups, as in the authors' code: CLIP towers at a small lr, hash heads at a large one.

    Feature-MLP towers are new layers, so they train at the head learning rate.
    """
    from dcgh_dist.models.towers import FeatureTower

    towers_are_new = isinstance(model.image_tower, FeatureTower)
    tower_lr = cfg.head_lr if towers_are_new else cfg.tower_lr
    groups = [
        {"params": model.tower_parameters(), "lr": scaled_lr(tower_lr, cfg, num_workers), "name": "towers"},
        {"params": model.head_parameters(), "lr": scaled_lr(cfg.head_lr, cfg, num_workers), "name": "heads"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: CrossModalHasher, cfg: OptimConfig, num_workers: int = 1) -> torch.optim.Optimizer:
    # AdamW with the authors' BertAdam hyper-parameters (betas 0.9/0.98, eps 1e-6, decoupled
    # weight decay 0.2). BertAdam skips Adam's bias correction; AdamW keeps it, which only
    # changes the first few steps, already damped by the warmup. fused: one kernel over all
    # parameters instead of a Python loop over ~100 tensors (on a CPU, 36 -> 5 ms a step for
    # the tiny preset, ~10% of the demo's epoch; docs/BENCHMARKS.md).
    return torch.optim.AdamW(
        param_groups(model, cfg, num_workers), betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
        fused=True,
    )


def warmup_cosine(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Multiplier: linear 0 -> 1 over the warmup, then cosine 1 -> 0 (BertAdam's warmup_cosine)."""
    total = max(1, total_steps)
    warmup = max(1, int(round(warmup_fraction * total))) if warmup_fraction > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total_steps, cfg.warmup_fraction)
    )
