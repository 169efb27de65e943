"""Gathering codes and labels across workers, kept apart from the loss (which stays pure).

Why gather with gradients: the pairwise terms couple every pair of samples. Entry (i, j) of a pair
matrix depends on sample i (on worker a) and sample j (on worker b), so in the single-process loss
both receive gradient from it. Gathering *without* gradient (and putting the local slice back, as
open_clip's ``gather_features`` does by default) loses the gradient to j for cross-worker pairs.
Here the gather's backward sums the gradient for every gathered slice over all workers and hands
each worker the slice of its own samples, so N workers x B reproduce one worker x N*B exactly.

Normalisation: ``dcgh_loss`` divides each worker's local-row sums by global counts, so the sum of
the workers' losses is the global loss. DDP (and DeepSpeed) *average* gradients, so each worker
back-propagates ``world_size * loss``; the proxies, which live outside DDP, have their gradients
averaged by ``all_reduce_grads``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    size = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _all_gather_padded(x: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate every rank's ``x`` (rows may differ per rank) in rank order."""
    max_n = max(sizes)
    padded = x.new_zeros((max_n, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int]) -> Tensor:  # type: ignore[override]
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        return _all_gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # Every rank holds a gradient for the whole gathered tensor; the true gradient of a slice
        # is the sum over ranks. all_reduce (supported by gloo and NCCL alike) then slice.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_batch(
    image_codes: Tensor, text_codes: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Codes (with gradient to their owners) and labels of all workers, in rank order.

    In a single process this returns the inputs unchanged.
    """
    if not is_distributed():
        return image_codes, text_codes, labels
    sizes = _gather_sizes(image_codes.shape[0], image_codes.device)
    return (
        _GatherWithGrad.apply(image_codes, sizes),
        _GatherWithGrad.apply(text_codes, sizes),
        _all_gather_padded(labels, sizes),
    )


def all_reduce_grads(params, average: bool = True) -> None:
    """All-reduce gradients of parameters that live outside DDP/DeepSpeed (the proxies)."""
    if not is_distributed():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            if average:
                p.grad.div_(dist.get_world_size())


def all_reduce_sum(values: dict[str, Tensor]) -> dict[str, float]:
    """Sum detached scalars over workers (for logging the global loss terms)."""
    keys = sorted(values)
    t = torch.stack([values[k].detach().float() for k in keys])
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def distributed_dcgh_loss(
    image_codes: Tensor, text_codes: Tensor, labels: Tensor, proxies: Tensor, cfg
) -> tuple[Tensor, dict[str, float]]:
    """The loss a worker back-propagates, and the global loss terms for logging.

    ``cfg.gather == "global"``: pair terms against the codes of all workers, normalised so the
    workers' losses sum to the single-process loss of the concatenated batch; the returned loss
    is scaled by the world size because DDP/DeepSpeed average gradients.
    ``"local"``: each worker's own batch only (the gradients are then the average of per-worker
    losses); logged terms are the mean over workers.
    """
    from dcgh_dist.losses import dcgh_loss

    n = world_size()
    if cfg.gather == "global" and n > 1:
        g_img, g_txt, g_lab = gather_batch(image_codes, text_codes, labels)
        terms = dcgh_loss(image_codes, text_codes, labels, proxies, cfg,
                          global_image_codes=g_img, global_text_codes=g_txt, global_labels=g_lab)
        return terms["total"] * n, all_reduce_sum(terms)
    terms = dcgh_loss(image_codes, text_codes, labels, proxies, cfg)
    return terms["total"], {k: v / n for k, v in all_reduce_sum(terms).items()}
