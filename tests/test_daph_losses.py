"""DAPH losses against the golden values of the authors' code (``tests/data/golden/DAPH.md`` §6).

Every comparison is float64 at 1e-8 relative (1e-12 absolute floor for zeros): several of the
mistakes DAPH.md lists move the values by only 1e-6..1e-8, and the mutation tests below check that
this tolerance really tells them apart.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

from dcgh_dist.config import Config, DAPHConfig, load_config
from dcgh_dist.losses import (
    anchor_partial_rows,
    anchor_partial_term,
    anchor_same_rows,
    anchor_same_term,
    class_rows,
    class_term,
    daph_anchor_masks,
    daph_hash_loss,
    daph_proxy_loss,
    multilabel_proxy_rows,
    multilabel_proxy_term,
    quantization_term,
)

RTOL, ATOL = 1e-8, 1e-12
CASES = range(4)
RULES = ("exact", "superset")
S1_TERMS = ("proxy_img", "proxy_txt", "orth", "balance", "quant_img", "quant_txt", "quant_class",
            "quant", "total")
S2_TERMS = ("same_img", "same_txt", "partial_img", "partial_txt", "cls", "total")


@pytest.fixture(scope="module")
def cases(golden_dir):
    path = golden_dir / "daph_loss_cases.npz"
    if not path.is_file():
        pytest.fail(f"golden reference values not found: {path}", pytrace=False)
    d = np.load(path)
    return [{k.split("_", 1)[1]: d[k] for k in d.files if k.startswith(f"case{i}_")} for i in CASES]


def _cfg(c) -> DAPHConfig:
    return DAPHConfig(**{k: float(c[k]) for k in ("gamma", "sigma", "alpha", "beta", "eta", "eps")})


def _t(c, key, grad=False):
    return torch.tensor(c[key], dtype=torch.float64, requires_grad=grad)


def _close(actual, expected, what):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=RTOL, atol=ATOL,
                               err_msg=what)


def _deviation(actual, expected) -> float:
    """Largest elementwise |a - e| / (ATOL + RTOL |e|): <= 1 passes the golden comparison."""
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float((np.abs(a - e) / (ATOL + RTOL * np.abs(e))).max())


def _stage1(c, cfg=None):
    h, t, p = _t(c, "s1_image_out", True), _t(c, "s1_text_out", True), _t(c, "s1_class_out", True)
    out = daph_proxy_loss(h, t, p, _t(c, "labels"), cfg or _cfg(c))
    out["total"].backward()
    return out, {"image_out": h.grad, "text_out": t.grad, "class_out": p.grad}


def _stage2(c, rule, cfg=None, masks=None):
    u = _t(c, "s2_out", True)
    ai, at, cc = _t(c, "s2_anchor_img", True), _t(c, "s2_anchor_txt", True), _t(c, "s2_class_codes", True)
    out = daph_hash_loss(u, _t(c, "labels"), ai, at, _t(c, "s2_anchor_labels"), cc, cfg or _cfg(c), rule,
                         masks=masks)
    out["total"].backward()
    return out, {"out": u.grad, "anchor_img": ai.grad, "anchor_txt": at.grad, "class_codes": cc.grad}


def _stage2_deviation(c, rule, out, grads) -> float:
    dev = [_deviation(out[k].item(), c[f"s2_{rule}_{k}"]) for k in S2_TERMS]
    dev += [_deviation(g.numpy(), c[f"s2_{rule}_grad_{k}"]) for k, g in grads.items()]
    return max(dev)


# --------------------------------------------------------------------------------------------
# golden parity


@pytest.mark.parametrize("case", CASES)
def test_stage1_terms_and_gradients_match_reference(cases, case):
    c = cases[case]
    out, grads = _stage1(c)
    assert set(out) == set(S1_TERMS)
    for k in S1_TERMS:
        _close(out[k].item(), c[f"s1_{k}"], f"case {case} s1 {k}")
    for k, g in grads.items():
        _close(g.numpy(), c[f"s1_grad_{k}"], f"case {case} s1 grad {k}")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", CASES)
def test_stage2_terms_and_gradients_match_reference(cases, case, rule):
    c = cases[case]
    out, grads = _stage2(c, rule)
    assert set(out) == set(S2_TERMS)
    for k in S2_TERMS:
        _close(out[k].item(), c[f"s2_{rule}_{k}"], f"case {case} {rule} {k}")
    # grad_out is what training uses; the anchor/class-code gradients pin the formula further.
    for k, g in grads.items():
        _close(g.numpy(), c[f"s2_{rule}_grad_{k}"], f"case {case} {rule} grad {k}")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", CASES)
def test_anchor_masks_match_reference(cases, case, rule):
    c = cases[case]
    pos, neg, partial, w = daph_anchor_masks(_t(c, "labels"), _t(c, "s2_anchor_labels"), rule, float(c["eps"]))
    assert pos.dtype == neg.dtype == partial.dtype == torch.bool
    for name, m in (("pos", pos), ("neg", neg), ("partial", partial)):
        np.testing.assert_array_equal(m.double().numpy(), c[f"s2_{rule}_{name}"], err_msg=name)
    _close(w.numpy(), c[f"s2_{rule}_partial_w"], "partial_w")
    # Each batch row is one of the anchors, so every row has a positive.
    assert pos[torch.arange(pos.shape[0]), torch.as_tensor(c["s2_batch_index"])].all()


def test_float32_stays_close_and_finite(cases):
    """The reference runs in float32 on the GPU: no overflow or cancellation there."""
    for c in cases:
        out = daph_proxy_loss(*(torch.tensor(c[k], dtype=torch.float32) for k in
                                ("s1_image_out", "s1_text_out", "s1_class_out", "labels")), _cfg(c))
        assert out["total"].item() == pytest.approx(float(c["s1_total"]), rel=1e-5)
        for rule in RULES:
            f = {k: torch.tensor(c[k], dtype=torch.float32) for k in
                 ("s2_out", "labels", "s2_anchor_img", "s2_anchor_txt", "s2_anchor_labels", "s2_class_codes")}
            o = daph_hash_loss(f["s2_out"], f["labels"], f["s2_anchor_img"], f["s2_anchor_txt"],
                               f["s2_anchor_labels"], f["s2_class_codes"], _cfg(c), rule)
            assert o["total"].item() == pytest.approx(float(c[f"s2_{rule}_total"]), rel=1e-5)


# --------------------------------------------------------------------------------------------
# the comparison is tight enough to catch the mistakes DAPH.md lists


def _proxy_rows_numpy(x, p, y, gamma, sigma, eps, plus_n=True, negative_constant=True):
    """An independent loop over the formulas of DAPH.md §1.2, with switches for two mistakes."""
    out = []
    for i in range(x.shape[0]):
        s = x[i] @ p.T
        pos = np.flatnonzero(y[i])
        neg = np.flatnonzero(y[i] == 0)
        n = len(pos)
        total = 0.0
        for j in pos:
            a = math.exp(gamma * (s[j] - sigma))
            d = sum(math.exp(gamma * s[k]) for k in neg) + (n if plus_n else 0) + a
            total += math.log(a / (d + eps) + eps)
        if negative_constant:
            total += len(neg) * math.log(1 + eps)
        out.append(-total / n)
    return np.array(out)


@pytest.mark.parametrize("case", CASES)
def test_independent_stage1_loop_agrees_and_each_mistake_is_caught(cases, case):
    c = cases[case]
    args = (c["s1_image_out"], c["s1_class_out"], c["labels"], float(c["gamma"]), float(c["sigma"]),
            float(c["eps"]))
    rows = multilabel_proxy_rows(*(torch.tensor(a) for a in args[:3]), *args[3:])
    _close(rows.numpy(), _proxy_rows_numpy(*args), "per-row proxy loss vs loop")
    _close(rows.sum().item(), c["s1_proxy_img"], "proxy_img")
    # Both mistakes would fail the golden comparison of proxy_img.
    assert _deviation(_proxy_rows_numpy(*args, plus_n=False).sum(), c["s1_proxy_img"]) > 10
    assert _deviation(_proxy_rows_numpy(*args, negative_constant=False).sum(), c["s1_proxy_img"]) > 10


@pytest.mark.parametrize("case", CASES)
def test_dropping_the_negative_class_constant_fails_the_total(cases, case):
    """(C - n_i) log(1 + eps) has no gradient, so only the value shows it: 2-8e-6 relative."""
    c = cases[case]
    out, _ = _stage1(c)
    y = c["labels"]
    n = y.sum(axis=1)
    dropped = out["total"].item() + 2 * float(((y.shape[1] - n) / n).sum()) * math.log1p(float(c["eps"]))
    assert _deviation(out["total"].item(), c["s1_total"]) <= 1
    assert _deviation(dropped, c["s1_total"]) > 10


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", CASES)
def test_stage2_mistakes_in_the_partial_weights_are_caught(cases, case, rule):
    c = cases[case]
    labels, anchor_labels, eps = _t(c, "labels"), _t(c, "s2_anchor_labels"), float(c["eps"])
    pos, neg, partial, w = daph_anchor_masks(labels, anchor_labels, rule, eps)
    # eps = 0 in the weights' denominator: down to 2e-9 on the total, but visible in the terms
    # and gradients.
    no_eps = daph_anchor_masks(labels, anchor_labels, rule, 0.0)
    assert _stage2_deviation(c, rule, *_stage2(c, rule, masks=no_eps)) > 1
    assert _deviation(no_eps[3].numpy(), c[f"s2_{rule}_partial_w"]) > 1
    # Normalising over the partial anchors only (leaving the positives out): percent-level.
    shared = labels @ anchor_labels.T
    part_only = torch.where(partial, shared, 0.0)
    w_part = part_only / (part_only.sum(dim=1, keepdim=True) + eps)
    assert _stage2_deviation(c, rule, *_stage2(c, rule, masks=(pos, neg, partial, w_part))) > 1e3


def test_guard_fires_in_case_1_and_matters(cases):
    """Case 1: a row with no negatives, output opposite its codes, so D < eps and g adds eps."""
    c = cases[1]
    masks = daph_anchor_masks(_t(c, "labels"), _t(c, "s2_anchor_labels"), "exact", float(c["eps"]))
    tiny = dataclasses.replace(_cfg(c), eps=1e-300)  # eps only in the guard: masks passed as is
    out, _ = _stage2(c, "exact", cfg=tiny, masks=masks)
    assert abs(out["total"].item() / float(c["s2_exact_total"]) - 1) > 0.05  # 13% in DAPH.md


@pytest.mark.parametrize("case", CASES)
def test_partial_is_averaged_over_rows_with_a_partial_anchor(cases, case):
    c = cases[case]
    out, _ = _stage2(c, "superset")
    _, _, partial, _ = daph_anchor_masks(_t(c, "labels"), _t(c, "s2_anchor_labels"), "superset", float(c["eps"]))
    r, b = int(partial.any(dim=1).sum()), partial.shape[0]
    if r < b:  # averaging over B instead would fail
        assert _deviation(out["partial_img"].item() * r / b, c["s2_superset_partial_img"]) > 10


# --------------------------------------------------------------------------------------------
# helpers, per-row reductions and the global-count contract


def test_term_helpers_are_row_sums_over_counts(cases):
    c = cases[0]
    cfg = _cfg(c)
    g, s, e = cfg.gamma, cfg.sigma, cfg.eps
    u, lab, ai, al, cc = (_t(c, k) for k in ("s2_out", "labels", "s2_anchor_img", "s2_anchor_labels",
                                             "s2_class_codes"))
    pos, neg, partial, w = daph_anchor_masks(lab, al, "exact", e)
    out = daph_hash_loss(u, lab, ai, _t(c, "s2_anchor_txt"), al, cc, cfg, "exact")
    same, has_pos = anchor_same_rows(u, ai, pos, neg, g, s, e)
    part, has_part = anchor_partial_rows(u, ai, neg, partial, w, g, s, e)
    assert has_pos.all()
    torch.testing.assert_close(anchor_same_term(u, ai, pos, neg, g, s, e), same.mean())
    torch.testing.assert_close(anchor_same_term(u, ai, pos, neg, g, s, e), out["same_img"])
    torch.testing.assert_close(anchor_partial_term(u, ai, neg, partial, w, g, s, e), part.sum() / has_part.sum())
    torch.testing.assert_close(anchor_partial_term(u, ai, neg, partial, w, g, s, e), out["partial_img"])
    torch.testing.assert_close(class_term(u, cc, lab, g, s), class_rows(u, cc, lab, g, s).mean())
    torch.testing.assert_close(class_term(u, cc, lab, g, s, row_count=10), class_rows(u, cc, lab, g, s).sum() / 10)
    assert multilabel_proxy_term(_t(c, "s1_image_out"), _t(c, "s1_class_out"), lab, g, s, e).item() == \
        pytest.approx(float(c["s1_proxy_img"]), rel=RTOL)
    assert quantization_term(_t(c, "s1_class_out")).item() == pytest.approx(float(c["s1_quant_class"]), rel=RTOL)


def test_rule_can_name_the_modality(cases):
    c = cases[0]
    cfg = _cfg(c)
    args = [_t(c, k) for k in ("s2_out", "labels", "s2_anchor_img", "s2_anchor_txt", "s2_anchor_labels",
                               "s2_class_codes")]
    for modality, rule in (("image", cfg.positive_rule_image), ("text", cfg.positive_rule_text)):
        torch.testing.assert_close(daph_hash_loss(*args, cfg, modality)["total"],
                                   daph_hash_loss(*args, cfg, rule)["total"])
    with pytest.raises(ValueError, match="rule must be one of"):
        daph_hash_loss(*args, cfg, "subset")
    with pytest.raises(ValueError, match="rule must be one of"):
        daph_anchor_masks(args[1], args[4], "image")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", CASES)
def test_stage2_split_with_global_counts_sums_to_whole_batch(cases, case, rule):
    """The contract the distributed wrapper relies on: local sums / global counts add up."""
    c = cases[case]
    cfg = _cfg(c)
    lab, al = _t(c, "labels"), _t(c, "s2_anchor_labels")
    anchors = [_t(c, k) for k in ("s2_anchor_img", "s2_anchor_txt")]
    cc = _t(c, "s2_class_codes")
    u = _t(c, "s2_out", True)
    whole = daph_hash_loss(u, lab, *anchors, al, cc, cfg, rule)
    (g_whole,) = torch.autograd.grad(whole["total"], u)
    _, _, partial, _ = daph_anchor_masks(lab, al, rule, cfg.eps)
    b, r = lab.shape[0], int(partial.any(dim=1).sum())
    cut = b // 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a part may lack partial rows of its own; fine
        parts = [daph_hash_loss(u[sl], lab[sl], *anchors, al, cc, cfg, rule, row_count=b, partial_row_count=r)
                 for sl in (slice(0, cut), slice(cut, b))]
    for k in S2_TERMS:
        torch.testing.assert_close(parts[0][k] + parts[1][k], whole[k], rtol=1e-12, atol=1e-14)
    (g_parts,) = torch.autograd.grad(parts[0]["total"] + parts[1]["total"], u)
    torch.testing.assert_close(g_parts, g_whole, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", CASES)
def test_stage1_split_with_global_sums_and_shares_sums_to_whole_batch(cases, case):
    c = cases[case]
    cfg = _cfg(c)
    h, t, p = _t(c, "s1_image_out", True), _t(c, "s1_text_out", True), _t(c, "s1_class_out", True)
    lab = _t(c, "labels")
    whole = daph_proxy_loss(h, t, p, lab, cfg)
    g_whole = torch.autograd.grad(whole["total"], (h, t, p))
    cut = lab.shape[0] // 2
    parts = [daph_proxy_loss(h[sl], t[sl], p, lab[sl], cfg, global_image_sum=h.sum(0),
                             global_text_sum=t.sum(0), shared_scale=0.5)
             for sl in (slice(0, cut), slice(cut, None))]
    for k in S1_TERMS:
        torch.testing.assert_close(parts[0][k] + parts[1][k], whole[k], rtol=1e-12, atol=1e-14)
    g_parts = torch.autograd.grad(parts[0]["total"] + parts[1]["total"], (h, t, p))
    for a, b in zip(g_parts, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # Without the global sums the balance term is a different loss: sum of squares != square.
    local = [daph_proxy_loss(h[sl], t[sl], p, lab[sl], cfg, shared_scale=0.5)
             for sl in (slice(0, cut), slice(cut, None))]
    assert (local[0]["balance"] + local[1]["balance"]).item() != pytest.approx(whole["balance"].item(), rel=1e-6)


def test_loss_does_not_normalise_the_stage1_codes(cases):
    """Case 3 has rows of norm 0.5..1.5: normalising them first would change the value."""
    c = cases[3]
    norms = np.linalg.norm(c["s1_image_out"], axis=1)
    assert np.abs(norms - 1).max() > 0.1
    n = torch.nn.functional.normalize
    out = daph_proxy_loss(n(_t(c, "s1_image_out")), n(_t(c, "s1_text_out")), n(_t(c, "s1_class_out")),
                          _t(c, "labels"), _cfg(c))
    assert _deviation(out["total"].item(), c["s1_total"]) > 10


# --------------------------------------------------------------------------------------------
# undefined cases (DAPH.md §4.9): an error for unlabelled rows, 0 with one warning otherwise


def _random(b=6, c=4, k=16, n=10, seed=0, single_label=False):
    g = torch.Generator().manual_seed(seed)
    if single_label:
        labels = torch.nn.functional.one_hot(torch.randint(0, c, (b,), generator=g), c).double()
    else:
        labels = (torch.rand(b, c, generator=g) < 0.5).double()
        labels[torch.arange(b), torch.randint(0, c, (b,), generator=g)] = 1
    anchor_labels = torch.cat([labels, (torch.rand(n - b, c, generator=g) < 0.5).double()])
    sign = lambda x: torch.where(x >= 0, 1.0, -1.0).double()  # noqa: E731
    return {
        "codes": torch.tanh(torch.randn(b, k, generator=g, dtype=torch.float64)).requires_grad_(),
        "labels": labels,
        "anchor_image": sign(torch.randn(n, k, generator=g)),
        "anchor_text": sign(torch.randn(n, k, generator=g)),
        "anchor_labels": anchor_labels,
        "class_codes": sign(torch.randn(c, k, generator=g)),
    }


def test_rows_without_labels_are_a_value_error_naming_them():
    d = _random()
    d["labels"][2] = 0
    d["labels"][4] = 0
    codes = torch.nn.functional.normalize(torch.randn(6, 16, dtype=torch.float64), dim=1)
    p = torch.nn.functional.normalize(torch.randn(4, 16, dtype=torch.float64), dim=1)
    match = r"2 of 6 rows have no label \(rows 2, 4\)"
    with pytest.raises(ValueError, match=match):
        daph_proxy_loss(codes, codes, p, d["labels"], DAPHConfig())
    with pytest.raises(ValueError, match=match):
        daph_hash_loss(**d, cfg=DAPHConfig(), rule="exact")
    with pytest.raises(ValueError, match=match):
        daph_anchor_masks(d["labels"], d["anchor_labels"], "superset")


def test_no_partial_anchor_gives_zero_with_one_warning():
    """Single-label data under 'superset': the reference's L_partial is NaN."""
    d = _random(single_label=True)
    d["anchor_labels"] = torch.nn.functional.one_hot(d["anchor_labels"].argmax(1), 4).double()
    with pytest.warns(RuntimeWarning, match="no row has a partial anchor") as rec:
        out = daph_hash_loss(**d, cfg=DAPHConfig(), rule="superset")
    assert len(rec) == 1
    assert out["partial_img"].item() == 0.0 and out["partial_txt"].item() == 0.0
    assert torch.isfinite(out["total"])
    out["total"].backward()
    assert torch.isfinite(d["codes"].grad).all()
    pos, neg, partial, w = daph_anchor_masks(d["labels"], d["anchor_labels"], "superset")
    with pytest.warns(RuntimeWarning, match="no row has a partial anchor"):
        assert anchor_partial_term(d["codes"], d["anchor_image"], neg, partial, w, 20.0, 0.2, 1e-5).item() == 0.0


def test_row_without_positive_anchor_adds_zero_with_one_warning():
    d = _random()
    # Row 0 holds every label and no anchor does, so under 'exact' row 0 has no positive; the
    # other rows are anchors themselves.
    full = (d["anchor_labels"] == 1).all(dim=1)
    d["anchor_labels"][full] = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    d["labels"] = d["anchor_labels"][:6].clone()
    d["labels"][0] = 1.0
    cfg = DAPHConfig()
    with pytest.warns(RuntimeWarning, match=r"1 batch row\(s\) have no positive anchor under rule 'exact' \(rows 0\)") as rec:
        out = daph_hash_loss(**d, cfg=cfg, rule="exact")
    assert len(rec) == 1
    pos, neg, _, _ = daph_anchor_masks(d["labels"], d["anchor_labels"], "exact")
    rows, has_pos = anchor_same_rows(d["codes"], d["anchor_image"], pos, neg, cfg.gamma, cfg.sigma, cfg.eps)
    assert not has_pos[0] and has_pos[1:].all() and rows[0].item() == 0.0
    # The row still counts in B, as in the reference's mean.
    torch.testing.assert_close(out["same_img"], rows.sum() / 6)
    out["total"].backward()
    assert torch.isfinite(d["codes"].grad).all()


def test_well_defined_batches_do_not_warn():
    d = _random()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        daph_hash_loss(**d, cfg=DAPHConfig(), rule="exact")


# --------------------------------------------------------------------------------------------
# config


def test_daph_config_defaults_are_the_authors():
    c = Config().daph
    assert (c.gamma, c.sigma, c.alpha, c.beta, c.eta, c.eps) == (20.0, 0.2, 0.2, 0.2, 1.0, 1e-5)
    assert (c.positive_rule_image, c.positive_rule_text) == ("exact", "superset")


@pytest.mark.parametrize("kwargs,match", [
    ({"gamma": 0.0}, "daph.gamma"), ({"gamma": float("nan")}, "daph.gamma"),
    ({"sigma": float("inf")}, "daph.sigma"), ({"alpha": -1.0}, "daph.alpha"),
    ({"beta": -0.1}, "daph.beta"), ({"eta": float("nan")}, "daph.eta"),
    ({"eps": 0.0}, "daph.eps"), ({"positive_rule_text": "subset"}, "daph.positive_rule_text"),
])
def test_daph_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DAPHConfig(**kwargs)


def test_daph_section_loads_from_overrides_and_round_trips(tmp_path):
    c = load_config(overrides=["daph.gamma=10", "daph.positive_rule_text=exact"])
    assert c.daph.gamma == 10.0 and isinstance(c.daph.gamma, float)
    assert c.daph.positive_rule_text == "exact"
    assert Config.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="daph.positive_rule_image"):
        load_config(overrides=["daph.positive_rule_image=any"])
