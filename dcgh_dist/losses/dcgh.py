"""DCGH loss: class-proxy, pairwise and variance terms, as pure functions of tensors.

Numerically this is ``HyP.forward`` of the authors' code (github donnotnormal/DCGH); see
``tests/data/golden/README.md`` for the exact definition and the golden tests for parity.

Distributed training (many workers) uses the *same* function: pass the codes and labels gathered
from all workers as ``global_*``. Each term is then a sum over the **local** rows against the
**global** columns, divided by counts taken over the **global** batch. Summed over workers that is
exactly the single-process loss on the concatenated batch, which is what makes N workers x B
equal one worker x N*B (see ``dcgh_dist/distributed.py``). With ``global_* = None`` the local batch
is the global batch and the result is the reference loss.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcgh_dist.config import LossConfig

__all__ = ["dcgh_loss", "init_proxies", "ClassProxies"]



def _cos(a: Tensor, b: Tensor) -> Tensor:
    return F.normalize(a, p=2, dim=1) @ F.normalize(b, p=2, dim=1).T


def _masked_mean(values: Tensor, mask: Tensor, count: Tensor | int) -> Tensor:
    """Sum of ``values`` where ``mask`` divided by ``count`` (a global count); 0 if count is 0."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    if isinstance(count, Tensor):
        return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
    return total / count if count > 0 else total * 0.0


def _proxy_terms(codes: Tensor, proxies: Tensor, pos_mask: Tensor, n_pos: Tensor, n_neg: Tensor):
    cos = _cos(codes, proxies)
    pos_dist = 1.0 - cos
    term = _masked_mean(pos_dist, pos_mask, n_pos) + _masked_mean(F.relu(cos), ~pos_mask, n_neg)
    return term, pos_dist


def _variance(pos_dist: Tensor, pos_mask: Tensor, mode: str, n_rows: int) -> Tensor:
    """Per-row spread of a code's distances to its relevant proxies, summed / global rows."""
    if mode == "reference":
        # Reference: unbiased variance over all C entries of the row with the irrelevant
        # entries set to 0 (torch.var(where(label == 1, 1 - cos, 0), dim=1)).
        masked = torch.where(pos_mask, pos_dist, torch.zeros_like(pos_dist))
        per_row = torch.var(masked, dim=1)
    elif mode == "masked":
        # The paper's text: variance over the relevant proxies only (population variance, so a
        # single-label row contributes exactly 0 rather than NaN).
        m = pos_mask.to(pos_dist.dtype)
        cnt = m.sum(dim=1).clamp_min(1)
        mean = (pos_dist * m).sum(dim=1) / cnt
        per_row = (((pos_dist - mean[:, None]) ** 2) * m).sum(dim=1) / cnt
    else:
        raise ValueError(f"variance_mode must be 'reference' or 'masked', got {mode!r}")
    return per_row.sum() / n_rows


def dcgh_loss(
    image_codes: Tensor,
    text_codes: Tensor,
    labels: Tensor,
    proxies: Tensor,
    config: LossConfig | None = None,
    *,
    global_image_codes: Tensor | None = None,
    global_text_codes: Tensor | None = None,
    global_labels: Tensor | None = None,
) -> Mapping[str, Tensor]:
    """DCGH loss terms for a batch.

    Args:
        image_codes, text_codes: (B, K) relaxed codes (tanh outputs) of the local batch.
        labels: (B, C) multi-hot labels (any numeric dtype; nonzero = relevant).
        proxies: (C, K) class proxies.
        config: weights and variance mode; defaults reproduce the authors' code.
        global_image_codes, global_text_codes, global_labels: the same for the batch gathered
            from all workers (local slice included, in rank order). All or none.

    Returns:
        ``{"proxy", "pairwise_pos", "pairwise_neg", "variance", "total"}``: unweighted terms and
        their weighted sum.
    """
    cfg = config or LossConfig()
    if image_codes.shape != text_codes.shape or image_codes.shape[0] != labels.shape[0]:
        raise ValueError(
            f"shape mismatch: image {tuple(image_codes.shape)}, text {tuple(text_codes.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    if labels.shape[1] != proxies.shape[0] or proxies.shape[1] != image_codes.shape[1]:
        raise ValueError(
            f"proxies {tuple(proxies.shape)} do not fit labels {tuple(labels.shape)} and "
            f"codes {tuple(image_codes.shape)}"
        )
    given = [t is not None for t in (global_image_codes, global_text_codes, global_labels)]
    if any(given) and not all(given):
        raise ValueError("pass all of global_image_codes, global_text_codes, global_labels")
    if not any(given):
        global_image_codes, global_text_codes, global_labels = image_codes, text_codes, labels

    dtype = image_codes.dtype
    lab = labels.to(dtype)
    glab = global_labels.to(dtype)
    pos_mask = lab != 0
    n_rows = glab.shape[0]

    # ---- proxy terms: counts of positive / negative (sample, class) entries, global batch
    n_pos = (glab != 0).sum()
    n_neg = (glab == 0).sum()
    proxy_img, dist_img = _proxy_terms(image_codes, proxies, pos_mask, n_pos, n_neg)
    proxy_txt, dist_txt = _proxy_terms(text_codes, proxies, pos_mask, n_pos, n_neg)
    proxy = proxy_img + proxy_txt

    # ---- variance constraint
    variance = _variance(dist_img, pos_mask, cfg.variance_mode, n_rows) + _variance(
        dist_txt, pos_mask, cfg.variance_mode, n_rows
    )

    # ---- positive pairs: S = cos(labels), pull cos(codes) up to S where S > 0
    sim = _cos(lab, glab)
    pos_pairs = sim > 0
    n_pos_pairs = (_cos(glab, glab) > 0).sum()
    pairwise_pos = sum(
        _masked_mean(F.relu(sim - _cos(a, b)), pos_pairs, n_pos_pairs)
        for a, b in (
            (image_codes, global_image_codes),
            (text_codes, global_text_codes),
            (image_codes, global_text_codes),
        )
    )

    # ---- negative pairs: among multi-label samples only, push apart pairs sharing no label
    multi = lab.sum(dim=1) > 1
    gmulti = glab.sum(dim=1) > 1
    overlap = lab[multi] @ glab[gmulti].T
    neg_pairs = overlap == 0
    g_overlap = glab[gmulti] @ glab[gmulti].T
    n_neg_pairs = (g_overlap == 0).sum()
    pairwise_neg = sum(
        _masked_mean(F.relu(_cos(a[multi], b[gmulti])), neg_pairs, n_neg_pairs)
        for a, b in (
            (image_codes, global_image_codes),
            (text_codes, global_text_codes),
            (image_codes, global_text_codes),
        )
    )

    total = (
        cfg.proxy_weight * proxy
        + cfg.pairwise_neg_weight * pairwise_neg
        + cfg.pairwise_pos_weight * pairwise_pos
        + cfg.variance_weight * variance
    )
    return {
        "proxy": proxy,
        "pairwise_pos": pairwise_pos,
        "pairwise_neg": pairwise_neg,
        "variance": variance,
        "total": total,
    }


def init_proxies(num_classes: int, bits: int, seed: int = 0, dtype=torch.float32) -> Tensor:
    """The reference initialisation: seeded randn, overwritten by kaiming-normal (fan_out), tanh.

    The throw-away ``randn`` draw is kept so that a given seed yields the reference's values.
    """
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(num_classes, bits, generator=g, dtype=dtype)
    nn.init.kaiming_normal_(p, mode="fan_out", generator=g)
    return torch.tanh(p)


class ClassProxies(nn.Module):
    """One learnable K-dim proxy per class. Kept outside the hasher: it has its own optimizer."""

    def __init__(self, num_classes: int, bits: int, seed: int = 0):
        super().__init__()
        self.weight = nn.Parameter(init_proxies(num_classes, bits, seed))

    def forward(self) -> Tensor:
        return self.weight

    def make_optimizer(self, cfg: LossConfig) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.parameters(),
            lr=cfg.proxy_lr,
            momentum=cfg.proxy_momentum,
            weight_decay=cfg.proxy_weight_decay,
        )


def proxies_state(proxies: Mapping[int, ClassProxies], primary: int) -> dict[str, Tensor]:
    """One ClassProxies per code length as one state dict (a checkpoint's ``proxies.pt``): the
    primary length under the one-length names, so a one-length checkpoint is what it always
    was, and every other length K under ``@K.<name>``."""
    return {(n if k == primary else f"@{k}.{n}"): v.detach().cpu()
            for k, p in proxies.items() for n, v in p.state_dict().items()}


def load_proxies_state(proxies: Mapping[int, ClassProxies], primary: int, state: Mapping[str, Tensor]) -> None:
    """The inverse of :func:`proxies_state`."""
    for k, p in proxies.items():
        p.load_state_dict({n: state[n if k == primary else f"@{k}.{n}"] for n in p.state_dict()})

