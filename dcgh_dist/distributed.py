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

DAPH (``distributed_daph_proxy_loss``, ``distributed_daph_hash_loss``) follows the same contract:
each worker's loss is its share of the global loss (local-row sums over global counts, plus
1/world_size of the terms that are not per-row), and it back-propagates ``world_size * loss``.
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
    # float64: the logged global terms of a float64 run stay exact (and cost nothing extra).
    t = torch.stack([values[k].detach().double() for k in keys])
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


def _all_reduce_counts(counts: list[int], device: torch.device) -> list[int]:
    t = torch.tensor(counts, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [int(v) for v in t.tolist()]


def _unlabelled_rows(labels: Tensor) -> int:
    return int((labels == 0).all(dim=1).sum()) if labels.numel() else 0


def _raise_if_unlabelled(local_bad: int, global_bad: int, labels: Tensor) -> None:
    """Raise on every rank together: one rank raising alone leaves the others blocked in the
    next collective."""
    if global_bad == 0:
        return
    if local_bad:
        from dcgh_dist.losses.daph import _label_mask

        _label_mask(labels)  # raises, naming this worker's rows
    raise ValueError(
        f"{global_bad} row(s) without labels in other workers' batches; DAPH needs at least one "
        "label per row: drop unlabelled items from the training split"
    )


def distributed_daph_proxy_loss(
    image_codes: Tensor, text_codes: Tensor, class_codes: Tensor, labels: Tensor, cfg
) -> tuple[Tensor, dict[str, float]]:
    """DAPH stage 1: the loss a worker back-propagates, and the global terms for logging.

    The proxy and quantisation terms of H and T are sums over rows: each worker sums its own.
    ``balance`` squares the column sums of H and T over the **global** batch (a sum of per-worker
    squares would be a different loss), so the (1, 2, K) local column sums are gathered with
    gradient, K floats per worker instead of the codes themselves. The class-code terms and the
    global balance are carried 1/world_size by each worker (``shared_scale``), so the workers'
    losses sum to the single-process loss of the concatenated batch, and the returned
    ``world_size * loss`` makes DDP's gradient average the gradient of that sum.

    Exact equivalence needs the same class codes on every worker: the class net in eval mode (or
    without dropout), as in the tests. With dropout each worker's class codes are their own
    sample, and the class-code terms are then averaged over the samples.
    """
    from dcgh_dist.losses import daph_proxy_loss

    n = world_size()
    if n == 1:
        terms = daph_proxy_loss(image_codes, text_codes, class_codes, labels, cfg)
        return terms["total"], all_reduce_sum(terms)
    local_bad = _unlabelled_rows(labels)
    (global_bad,) = _all_reduce_counts([local_bad], labels.device)
    _raise_if_unlabelled(local_bad, global_bad, labels)
    local_sums = torch.stack([image_codes.sum(dim=0), text_codes.sum(dim=0)])[None]
    global_sums = _GatherWithGrad.apply(local_sums, [1] * n).sum(dim=0)
    terms = daph_proxy_loss(
        image_codes, text_codes, class_codes, labels, cfg,
        global_image_sum=global_sums[0], global_text_sum=global_sums[1], shared_scale=1.0 / n,
    )
    return terms["total"] * n, all_reduce_sum(terms)


def distributed_daph_hash_loss(
    codes: Tensor,
    labels: Tensor,
    anchor_image: Tensor,
    anchor_text: Tensor,
    anchor_labels: Tensor,
    class_codes: Tensor,
    cfg,
    rule: str,
) -> tuple[Tensor, dict[str, float]]:
    """DAPH stage 2: the loss a worker back-propagates, and the global terms for logging.

    Given the anchors, every row's terms depend on that row alone, so nothing is gathered: each
    worker sums its rows' values and divides by the **global** counts (B for L_same and L_class,
    the rows with a partial anchor for L_partial), all-reduced once per step. The workers' losses
    then sum to the single-process loss, and ``world_size * loss`` is returned for DDP's average.

    The anchors (N x K +-1 proxy codes of both modalities, their labels, the class codes) are
    constants, replicated on every worker, never gathered. What that costs per worker: N x K/8
    bytes per anchor set packed (8 GB for 1e9 anchors at 64 bits) plus N x C label bits, more once
    unpacked for the matmul (2 bytes per bit in bf16), and each step builds (B, N) similarities
    and masks: B x N x K multiply-adds per anchor set and several B x N temporaries. That is fine
    up to ~1e7 anchors. At 1e8-1e9 shard the anchors across workers instead: each worker scores
    the gathered batch rows (gathered with gradient) against its N/W anchors and all-reduces the
    per-row partial sums (negatives' exp sums, sum_j S_ij, sum_j w_ij z_ij, positive and partial
    counts); the per-row log terms are then summed over shards the same way.
    """
    from dcgh_dist.losses import daph_anchor_masks, daph_hash_loss, resolve_positive_rule

    n = world_size()
    if n == 1:
        terms = daph_hash_loss(codes, labels, anchor_image, anchor_text, anchor_labels, class_codes,
                               cfg, rule)
        return terms["total"], all_reduce_sum(terms)
    rule = resolve_positive_rule(cfg, rule)
    local_bad = _unlabelled_rows(labels)
    masks = None
    n_partial = 0
    if not local_bad:
        masks = daph_anchor_masks(labels, anchor_labels, rule, cfg.eps, dtype=codes.dtype)
        n_partial = int(masks[2].any(dim=1).sum())
    rows, partial_rows, global_bad = _all_reduce_counts(
        [codes.shape[0], n_partial, local_bad], codes.device
    )
    _raise_if_unlabelled(local_bad, global_bad, labels)
    terms = daph_hash_loss(codes, labels, anchor_image, anchor_text, anchor_labels, class_codes,
                           cfg, rule, masks=masks, row_count=rows, partial_row_count=partial_rows)
    return terms["total"] * n, all_reduce_sum(terms)
