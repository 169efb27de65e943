"""DAPH losses (Data-Aware Proxy Hashing, SIGIR 2023) as pure functions of tensors.

Numerically these are the loss statements of the authors' code (github rongchengtu1/DAPH,
``DAPH_proxy_code.py`` for stage 1 and ``DAPH.py`` for stage 2); ``tests/data/golden/DAPH.md``
gives the formulas and every place an epsilon goes, and ``tests/test_daph_losses.py`` checks them
against the golden values at 1e-8 relative in float64.

Stage 1 (``daph_proxy_loss``) trains the label-conditioned proxy nets and the class net; stage 2
(``daph_hash_loss``) trains a label-free hashing net of one modality against the frozen stage-1
codes ("anchors", one per training item) and class codes.

How the reductions are split, so a distributed wrapper (``dcgh_dist/distributed.py``) can make
N workers x B rows equal one process x N*B rows without any process group in here:

* Stage 1: the proxy and quantisation terms of H and T are plain **sums over rows** (as in the
  reference), so a worker sums its own rows. The terms that depend only on the class codes
  (``orth``, ``quant_class`` and the class part of ``balance``) and the balance of H and T, which
  squares column sums over the **whole** batch, are not per-row: the caller passes the global
  column sums (``global_image_sum``/``global_text_sum``) and ``shared_scale=1/world_size`` so each
  worker carries an equal share of them. Summed over workers, every returned term is the global one.
* Stage 2: rows are independent given the anchors (constants), so every term is a sum of per-row
  values divided by a count: B for L_same and L_class, the number of rows that have a partial
  anchor for L_partial. ``*_rows`` return the per-row values; ``row_count``/``partial_row_count``
  replace the local counts by global ones.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dcgh_dist.config import DAPH_POSITIVE_RULES, DAPHConfig

__all__ = [
    "anchor_partial_rows",
    "anchor_partial_term",
    "anchor_same_rows",
    "anchor_same_term",
    "class_rows",
    "class_term",
    "daph_anchor_masks",
    "daph_hash_loss",
    "daph_proxy_loss",
    "multilabel_proxy_rows",
    "multilabel_proxy_term",
    "quantization_rows",
    "quantization_term",
    "resolve_positive_rule",
]

Rule = Literal["exact", "superset"]


# --------------------------------------------------------------------------------------------
# shared helpers


def _label_mask(labels: Tensor, what: str = "labels") -> Tensor:
    """Boolean (B, C) relevance mask (nonzero = relevant); every row must hold a label.

    The reference divides by the label count, so a row without labels gives inf/NaN there
    (DAPH.md §4.9); here it is an error naming the rows.
    """
    if labels.dim() != 2:
        raise ValueError(f"{what} must be (rows, classes), got shape {tuple(labels.shape)}")
    mask = labels != 0
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if empty.numel():
        shown = empty[:10].tolist()
        more = ", ..." if empty.numel() > 10 else ""
        raise ValueError(
            f"{what}: {empty.numel()} of {labels.shape[0]} rows have no label (rows "
            f"{str(shown)[1:-1]}{more}); DAPH needs at least one label per row: drop unlabelled "
            "items from the training split"
        )
    return mask


def _guard(x: Tensor, eps: float) -> Tensor:
    """The reference's small-denominator guard g(x) = x + eps*[x < eps] (gradient 1 everywhere)."""
    return torch.where(x < eps, x + eps, x)


def _zero(t: Tensor) -> Tensor:
    return t.new_zeros(())


# --------------------------------------------------------------------------------------------
# stage 1: data-aware proxy network


def multilabel_proxy_rows(
    codes: Tensor, class_codes: Tensor, labels: Tensor, gamma: float, sigma: float, eps: float
) -> Tensor:
    """Per-row multi-label proxy loss ``l_i`` (B,) of stage 1 (paper L3; DAPH.md §1.2 item 2).

    ``codes`` (B, K) and ``class_codes`` (C, K) are used as given: the networks normalise them, the
    loss does not (dot products, not cosines, when the rows are not unit vectors).
    """
    y = _label_mask(labels)
    n = y.sum(dim=1).to(codes.dtype)
    s = codes @ class_codes.T
    # The reference sums exp(gamma * s * (1 - Y)) over all classes: each positive class adds
    # exp(0) = 1, hence "+ n" next to the negatives' sum.
    neg_sum = torch.where(y, _zero(s), torch.exp(gamma * s)).sum(dim=1)
    a = torch.exp(gamma * (s - sigma))
    r = a / (neg_sum[:, None] + n[:, None] + a + eps)
    pos_log = torch.where(y, torch.log(r + eps), _zero(s)).sum(dim=1)
    # Each negative class contributes log(0 + eps + 1) in the reference: no gradient, but part of
    # the value (leaving it out moves the total by a few 1e-6 relative).
    const = (y.shape[1] - n) * math.log1p(eps)
    return -(pos_log + const) / n


def multilabel_proxy_term(
    codes: Tensor, class_codes: Tensor, labels: Tensor, gamma: float, sigma: float, eps: float
) -> Tensor:
    """Stage-1 proxy loss: the **sum** over rows of ``multilabel_proxy_rows`` (not a mean)."""
    return multilabel_proxy_rows(codes, class_codes, labels, gamma, sigma, eps).sum()


def quantization_rows(codes: Tensor) -> Tensor:
    """Per-row ``(<normalize(sign(x)), x> - 1)^2`` (B,). The target carries no gradient."""
    target = F.normalize(torch.sign(codes.detach()), p=2, dim=1)
    return ((target * codes).sum(dim=1) - 1.0) ** 2


def quantization_term(codes: Tensor) -> Tensor:
    """Stage-1 quantisation term: the sum over rows of ``quantization_rows``."""
    return quantization_rows(codes).sum()


def daph_proxy_loss(
    image_codes: Tensor,
    text_codes: Tensor,
    class_codes: Tensor,
    labels: Tensor,
    cfg: DAPHConfig | None = None,
    *,
    global_image_sum: Tensor | None = None,
    global_text_sum: Tensor | None = None,
    shared_scale: float = 1.0,
) -> dict[str, Tensor]:
    """Stage-1 loss terms (DAPH.md §1.2).

    Args:
        image_codes, text_codes: (B, K) outputs of the image/text proxy nets (H, T).
        class_codes: (C, K) class-net outputs (P).
        labels: (B, C) multi-hot labels, every row with at least one label.
        cfg: gamma, sigma, alpha (balance), beta (quantisation), eps.
        global_image_sum, global_text_sum: (K,) column sums of H and T over the batch of all
            workers (with gradient to every worker's rows); None = this batch's sums.
        shared_scale: multiplies the terms that do not belong to this batch's rows (``orth``,
            ``quant_class``, ``balance``); ``1/world_size`` in a distributed step.

    Returns:
        ``proxy_img, proxy_txt, orth, balance, quant_img, quant_txt, quant_class, quant, total``,
        with ``total = proxy_img + proxy_txt + beta*quant + orth + alpha*balance``.
    """
    cfg = cfg or DAPHConfig()
    b, k = image_codes.shape
    if text_codes.shape != (b, k) or class_codes.dim() != 2 or class_codes.shape[1] != k:
        raise ValueError(
            f"shape mismatch: image {tuple(image_codes.shape)}, text {tuple(text_codes.shape)}, "
            f"class codes {tuple(class_codes.shape)}"
        )
    if tuple(labels.shape) != (b, class_codes.shape[0]):
        raise ValueError(
            f"labels {tuple(labels.shape)} do not fit {b} rows and {class_codes.shape[0]} class codes"
        )
    g, s, e = cfg.gamma, cfg.sigma, cfg.eps
    proxy_img = multilabel_proxy_term(image_codes, class_codes, labels, g, s, e)
    proxy_txt = multilabel_proxy_term(text_codes, class_codes, labels, g, s, e)

    eye = torch.eye(class_codes.shape[0], dtype=class_codes.dtype, device=class_codes.device)
    # The sum includes the diagonal, which is 0 for unit rows (the net normalises them).
    orth = F.relu(class_codes @ class_codes.T - eye).pow(2).sum() * shared_scale

    img_sum = image_codes.sum(dim=0) if global_image_sum is None else global_image_sum
    txt_sum = text_codes.sum(dim=0) if global_text_sum is None else global_text_sum
    balance = (
        class_codes.sum(dim=0).pow(2).sum() + txt_sum.pow(2).sum() + img_sum.pow(2).sum()
    ) * shared_scale

    quant_img = quantization_term(image_codes)
    quant_txt = quantization_term(text_codes)
    quant_class = quantization_term(class_codes) * shared_scale
    quant = quant_img + quant_txt + quant_class

    total = proxy_img + proxy_txt + cfg.beta * quant + orth + cfg.alpha * balance
    return {
        "proxy_img": proxy_img,
        "proxy_txt": proxy_txt,
        "orth": orth,
        "balance": balance,
        "quant_img": quant_img,
        "quant_txt": quant_txt,
        "quant_class": quant_class,
        "quant": quant,
        "total": total,
    }


# --------------------------------------------------------------------------------------------
# stage 2: hashing against the proxy codes


def resolve_positive_rule(cfg: DAPHConfig, rule: str) -> Rule:
    """``"exact"``/``"superset"`` as given; ``"image"``/``"text"``: the config's rule for the
    modality being trained (``positive_rule_image``/``positive_rule_text``)."""
    if rule == "image":
        return cfg.positive_rule_image
    if rule == "text":
        return cfg.positive_rule_text
    if rule not in DAPH_POSITIVE_RULES:
        raise ValueError(f"rule must be one of {list(DAPH_POSITIVE_RULES)} or 'image'/'text', got {rule!r}")
    return rule  # type: ignore[return-value]


def daph_anchor_masks(
    labels: Tensor,
    anchor_labels: Tensor,
    rule: Rule,
    eps: float = 1e-5,
    *,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stage-2 masks between batch rows and anchors, from labels only (no gradient).

    With ``S = Y L_a^T`` (shared label counts), ``n_i`` the row's and ``m_j`` the anchor's label
    count: ``neg = [S = 0]``; ``pos = [S = n_i and S = m_j]`` (rule ``exact``, identical label
    sets) or ``[S = n_i]`` (``superset``: the anchor holds every label of the row);
    ``partial = not pos and not neg``; ``partial_w = partial * S / (sum_j S_ij + eps)``, the sum
    running over **all** anchors, positives included (DAPH.md §4.3).

    Returns ``(pos, neg, partial, partial_w)``: three boolean (B, N) masks and the float weights
    (``dtype``, default the labels' floating dtype or torch's default).
    """
    if rule not in DAPH_POSITIVE_RULES:
        raise ValueError(f"rule must be one of {list(DAPH_POSITIVE_RULES)}, got {rule!r}")
    y = _label_mask(labels)
    if anchor_labels.dim() != 2 or anchor_labels.shape[1] != labels.shape[1]:
        raise ValueError(
            f"anchor_labels {tuple(anchor_labels.shape)} do not fit labels {tuple(labels.shape)}"
        )
    if dtype is None:
        dtype = labels.dtype if labels.is_floating_point() else torch.get_default_dtype()
    yf = y.to(dtype)
    af = (anchor_labels != 0).to(dtype)
    shared = yf @ af.T  # small integers: exact in floating point
    n = yf.sum(dim=1, keepdim=True)
    m = af.sum(dim=1)[None, :]
    neg = shared == 0
    # The reference's comparisons: S > n - 0.2 (and S > m - 0.2), i.e. S == n on integer counts.
    pos = shared > n - 0.2
    if rule == "exact":
        pos = pos & (shared > m - 0.2)
    partial = ~pos & ~neg
    partial_w = torch.where(partial, shared, _zero(shared)) / (shared.sum(dim=1, keepdim=True) + eps)
    return pos, neg, partial, partial_w


def _similarity(codes: Tensor, codes_b: Tensor) -> Tensor:
    # Stage 2 scales by 1/K (tanh outputs against +-1 codes), unlike stage 1's cosines.
    return codes @ codes_b.T / codes.shape[1]


def _neg_exp_sum(z: Tensor, neg: Tensor, gamma: float) -> Tensor:
    return torch.where(neg, torch.exp(gamma * z), _zero(z)).sum(dim=1)


def _same_rows(z, neg_sum, pos, gamma, sigma, eps) -> tuple[Tensor, Tensor]:
    logit = gamma * (z - sigma)
    # Only the negatives and this one positive are in the denominator (not the other positives
    # nor the partial anchors). log(a / g(D)) written as log a - log g(D): the same value, and it
    # stays finite in float32 should a underflow.
    log_ratio = logit - torch.log(_guard(neg_sum[:, None] + torch.exp(logit), eps))
    n_pos = pos.sum(dim=1)
    rows = -torch.where(pos, log_ratio, _zero(z)).sum(dim=1) / n_pos.clamp_min(1).to(z.dtype)
    return rows, n_pos > 0


def _partial_rows(z, neg_sum, partial, partial_w, gamma, sigma, eps) -> tuple[Tensor, Tensor]:
    mu = (partial_w.to(z.dtype) * z).sum(dim=1)
    logit = gamma * (mu - sigma)
    log_ratio = logit - torch.log(_guard(neg_sum + torch.exp(logit), eps))
    has = partial.any(dim=1)
    return torch.where(has, -log_ratio, _zero(z)), has


def anchor_same_rows(
    codes: Tensor, anchors: Tensor, pos: Tensor, neg: Tensor, gamma: float, sigma: float, eps: float
) -> tuple[Tensor, Tensor]:
    """Per-row L_same (B,) against one anchor set, and which rows have a positive anchor.

    Row i: ``-(1/|pos_i|) sum_{j in pos_i} log(a_ij / g(D_ij))``; 0 for a row without positives
    (the reference's 0/0).
    """
    z = _similarity(codes, anchors)
    return _same_rows(z, _neg_exp_sum(z, neg, gamma), pos, gamma, sigma, eps)


def anchor_partial_rows(
    codes: Tensor,
    anchors: Tensor,
    neg: Tensor,
    partial: Tensor,
    partial_w: Tensor,
    gamma: float,
    sigma: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Per-row L_partial (B,) against one anchor set (0 where a row has no partial anchor), and
    which rows have one (the rows L_partial is averaged over)."""
    z = _similarity(codes, anchors)
    return _partial_rows(z, _neg_exp_sum(z, neg, gamma), partial, partial_w, gamma, sigma, eps)


def class_rows(codes: Tensor, class_codes: Tensor, labels: Tensor, gamma: float, sigma: float) -> Tensor:
    """Per-row L_class (B,): ``-log(a_i / D_i)`` with the mean similarity to the row's classes.

    No epsilon anywhere, as in the reference.
    """
    y = _label_mask(labels)
    q = _similarity(codes, class_codes)
    mean_pos = torch.where(y, q, _zero(q)).sum(dim=1) / y.sum(dim=1).to(q.dtype)
    logit = gamma * (mean_pos - sigma)
    denom = torch.where(y, _zero(q), torch.exp(gamma * q)).sum(dim=1) + torch.exp(logit)
    return -(logit - torch.log(denom))


def _under(rule: str | None) -> str:
    return f" under rule {rule!r}" if rule else ""


def _warn_no_positive(has_pos: Tensor, rule: str | None = None) -> str | None:
    missing = (~has_pos).nonzero().flatten()
    if not missing.numel():
        return None
    return (
        f"{missing.numel()} batch row(s) have no positive anchor{_under(rule)} (rows "
        f"{str(missing[:10].tolist())[1:-1]}{', ...' if missing.numel() > 10 else ''}): their "
        "L_same is 0 (the reference gives NaN). Every batch row should itself be an anchor"
    )


def _no_partial_message(rule: str | None = None) -> str:
    # Constant text: Python's default filter then shows it once per call site, not every step.
    return (
        f"no row has a partial anchor{_under(rule)}: L_partial is 0 (the reference gives "
        "NaN); expected for single-label data, or single-label batches under 'superset'"
    )


def _mean(total: Tensor, count: int) -> Tensor:
    return total / count if count > 0 else total * 0.0


def anchor_same_term(
    codes: Tensor,
    anchors: Tensor,
    pos: Tensor,
    neg: Tensor,
    gamma: float,
    sigma: float,
    eps: float,
    *,
    row_count: int | None = None,
) -> Tensor:
    """L_same: per-row values summed and divided by ``row_count`` (default: B)."""
    rows, has_pos = anchor_same_rows(codes, anchors, pos, neg, gamma, sigma, eps)
    msg = _warn_no_positive(has_pos)
    if msg:
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return _mean(rows.sum(), rows.shape[0] if row_count is None else int(row_count))


def anchor_partial_term(
    codes: Tensor,
    anchors: Tensor,
    neg: Tensor,
    partial: Tensor,
    partial_w: Tensor,
    gamma: float,
    sigma: float,
    eps: float,
    *,
    partial_row_count: int | None = None,
) -> Tensor:
    """L_partial: the per-row values summed and divided by ``partial_row_count`` (default: the
    rows of this batch that have a partial anchor); 0, with a warning, when that count is 0."""
    rows, has = anchor_partial_rows(codes, anchors, neg, partial, partial_w, gamma, sigma, eps)
    count = int(has.sum()) if partial_row_count is None else int(partial_row_count)
    if count == 0:
        warnings.warn(_no_partial_message(), RuntimeWarning, stacklevel=2)
    return _mean(rows.sum(), count)


def class_term(
    codes: Tensor, class_codes: Tensor, labels: Tensor, gamma: float, sigma: float,
    *, row_count: int | None = None,
) -> Tensor:
    """L_class: per-row values summed and divided by ``row_count`` (default: B)."""
    rows = class_rows(codes, class_codes, labels, gamma, sigma)
    return _mean(rows.sum(), rows.shape[0] if row_count is None else int(row_count))


def daph_hash_loss(
    codes: Tensor,
    labels: Tensor,
    anchor_image: Tensor,
    anchor_text: Tensor,
    anchor_labels: Tensor,
    class_codes: Tensor,
    cfg: DAPHConfig,
    rule: str,
    *,
    masks: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    row_count: int | None = None,
    partial_row_count: int | None = None,
) -> dict[str, Tensor]:
    """Stage-2 loss terms for one batch of the modality being trained (DAPH.md §2.2).

    Args:
        codes: (B, K) tanh outputs of the hashing net.
        labels: (B, C) batch labels, every row with at least one label.
        anchor_image, anchor_text: (N, K) +-1 image-aware and text-aware proxy codes (sign applied
            once, at load). Treated as constants in training; gradients flow to them only if the
            caller passes tensors that require grad.
        anchor_labels: (N, C) labels of the anchors.
        class_codes: (C, K) +-1 class codes.
        rule: ``"exact"`` or ``"superset"``, or ``"image"``/``"text"`` for the config's rule of
            that modality.
        masks: ``daph_anchor_masks(labels, anchor_labels, rule, eps)`` if already computed.
        row_count: the divisor of L_same and L_class (default B; the global B in a distributed
            step).
        partial_row_count: the divisor of L_partial (default: the rows of this batch that have a
            partial anchor; the global count in a distributed step).

    Returns:
        ``same_img, same_txt, partial_img, partial_txt, cls, total`` with
        ``total = same_img + same_txt + cls + eta * (partial_img + partial_txt)``.
        A row without a positive anchor adds 0 to L_same (it still counts in B); L_partial is 0
        when no row has a partial anchor; either case warns once per call.
    """
    rule = resolve_positive_rule(cfg, rule)
    b, k = codes.shape
    for name, a in (("anchor_image", anchor_image), ("anchor_text", anchor_text)):
        if a.dim() != 2 or a.shape[1] != k or a.shape[0] != anchor_labels.shape[0]:
            raise ValueError(
                f"{name} {tuple(a.shape)} does not fit {k}-bit codes and "
                f"{anchor_labels.shape[0]} anchor labels"
            )
    if tuple(class_codes.shape) != (labels.shape[1], k) or labels.shape[0] != b:
        raise ValueError(
            f"shape mismatch: codes {tuple(codes.shape)}, labels {tuple(labels.shape)}, "
            f"class codes {tuple(class_codes.shape)}"
        )
    g, s, e = cfg.gamma, cfg.sigma, cfg.eps
    if masks is None:
        masks = daph_anchor_masks(labels, anchor_labels, rule, e, dtype=codes.dtype)
    pos, neg, partial, partial_w = masks

    n_rows = b if row_count is None else int(row_count)
    terms: dict[str, Tensor] = {}
    has_pos = has_partial = None
    # One (B, N) similarity per anchor set, shared by L_same and L_partial.
    for tag, anchors in (("img", anchor_image), ("txt", anchor_text)):
        z = _similarity(codes, anchors)
        neg_sum = _neg_exp_sum(z, neg, g)
        same, has_pos = _same_rows(z, neg_sum, pos, g, s, e)
        part, has_partial = _partial_rows(z, neg_sum, partial, partial_w, g, s, e)
        terms[f"same_{tag}"] = same.sum()
        terms[f"partial_{tag}"] = part.sum()
    n_partial = int(has_partial.sum()) if partial_row_count is None else int(partial_row_count)

    # The masks are the same for both anchor sets, so each condition is checked once.
    notes = [m for m in (_warn_no_positive(has_pos, rule),
                         _no_partial_message(rule) if n_partial == 0 else None) if m]
    if notes:
        warnings.warn("; ".join(notes), RuntimeWarning, stacklevel=2)

    out = {
        "same_img": _mean(terms["same_img"], n_rows),
        "same_txt": _mean(terms["same_txt"], n_rows),
        "partial_img": _mean(terms["partial_img"], n_partial),
        "partial_txt": _mean(terms["partial_txt"], n_partial),
        "cls": _mean(class_rows(codes, class_codes, labels, g, s).sum(), n_rows),
    }
    out["total"] = (
        out["same_img"] + out["same_txt"] + out["cls"]
        + cfg.eta * (out["partial_img"] + out["partial_txt"])
    )
    return out
