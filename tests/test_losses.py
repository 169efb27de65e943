import numpy as np
import pytest
import torch

from dcgh_dist.config import LossConfig
from dcgh_dist.losses import ClassProxies, dcgh_loss, init_proxies

CASES = range(4)


def _load(golden_dir, i):
    d = np.load(golden_dir / "dcgh_loss_cases.npz")
    return {k.split("_", 1)[1]: d[k] for k in d.files if k.startswith(f"case{i}_")}


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_loss_and_gradients(golden_dir, case):
    c = _load(golden_dir, case)
    x = torch.tensor(c["x"], requires_grad=True)
    y = torch.tensor(c["y"], requires_grad=True)
    p = torch.tensor(c["proxies"], requires_grad=True)
    terms = dcgh_loss(x, y, torch.tensor(c["labels"]), p)
    terms["total"].backward()
    assert abs(terms["total"].item() - float(c["loss"])) <= 1e-6 * abs(float(c["loss"]))
    assert _rel(x.grad.numpy(), c["grad_x"]) < 1e-6
    assert _rel(y.grad.numpy(), c["grad_y"]) < 1e-6
    assert _rel(p.grad.numpy(), c["grad_proxies"]) < 1e-6


def test_terms_are_named_and_total_is_weighted_sum(golden_dir):
    c = _load(golden_dir, 1)
    cfg = LossConfig(proxy_weight=2.0, pairwise_pos_weight=0.3, pairwise_neg_weight=0.1, variance_weight=0.5)
    t = dcgh_loss(torch.tensor(c["x"]), torch.tensor(c["y"]), torch.tensor(c["labels"]),
                  torch.tensor(c["proxies"]), cfg)
    assert set(t) == {"proxy", "pairwise_pos", "pairwise_neg", "variance", "total"}
    expected = 2.0 * t["proxy"] + 0.3 * t["pairwise_pos"] + 0.1 * t["pairwise_neg"] + 0.5 * t["variance"]
    torch.testing.assert_close(t["total"], expected)


def test_single_label_batch_has_zero_negative_pair_term(golden_dir):
    c = _load(golden_dir, 2)  # single-label only: no sample qualifies for the n2n term
    t = dcgh_loss(torch.tensor(c["x"]), torch.tensor(c["y"]), torch.tensor(c["labels"]),
                  torch.tensor(c["proxies"]))
    assert t["pairwise_neg"].item() == 0.0


def _masked_variance_naive(codes, proxies, labels):
    cos = torch.nn.functional.normalize(codes, dim=1) @ torch.nn.functional.normalize(proxies, dim=1).T
    vals = []
    for i in range(codes.shape[0]):
        d = (1 - cos[i])[labels[i] != 0]
        vals.append(((d - d.mean()) ** 2).mean())
    return torch.stack(vals).mean()


def test_masked_variance_is_population_variance_over_relevant_proxies(golden_dir):
    c = _load(golden_dir, 3)
    x, y, p, lab = (torch.tensor(c[k]) for k in ("x", "y", "proxies", "labels"))
    masked = dcgh_loss(x, y, lab, p, LossConfig(variance_mode="masked"))
    ref = dcgh_loss(x, y, lab, p)
    expected = _masked_variance_naive(x, p, lab) + _masked_variance_naive(y, p, lab)
    torch.testing.assert_close(masked["variance"], expected, rtol=1e-10, atol=1e-12)
    # the other terms don't depend on the variance mode
    for k in ("proxy", "pairwise_pos", "pairwise_neg"):
        torch.testing.assert_close(masked[k], ref[k])
    assert not torch.allclose(masked["variance"], ref["variance"])


def test_masked_variance_zero_for_single_label_and_equal_distances():
    torch.manual_seed(0)
    p = torch.randn(5, 16, dtype=torch.float64)
    x = torch.randn(4, 16, dtype=torch.float64)
    lab = torch.zeros(4, 5, dtype=torch.float64)
    lab[torch.arange(4), torch.tensor([0, 1, 2, 3])] = 1
    t = dcgh_loss(x, x.clone(), lab, p, LossConfig(variance_mode="masked"))
    assert t["variance"].item() == 0.0
    t_ref = dcgh_loss(x, x.clone(), lab, p)  # reference mode: zeros count, so not 0
    assert t_ref["variance"].item() > 0


def test_masked_mode_gradients_are_finite():
    torch.manual_seed(1)
    x = torch.randn(8, 32, dtype=torch.float64, requires_grad=True)
    y = torch.randn(8, 32, dtype=torch.float64, requires_grad=True)
    p = torch.randn(6, 32, dtype=torch.float64, requires_grad=True)
    lab = (torch.rand(8, 6) < 0.4).double()
    lab[:, 0] = 1
    dcgh_loss(x, y, lab, p, LossConfig(variance_mode="masked"))["total"].backward()
    assert all(torch.isfinite(t.grad).all() for t in (x, y, p))
    assert torch.autograd.gradcheck(
        lambda a, b, q: dcgh_loss(a, b, lab, q, LossConfig(variance_mode="masked"))["total"],
        (x.detach().requires_grad_(), y.detach().requires_grad_(), p.detach().requires_grad_()),
    )


def test_bad_shapes_raise():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="shape mismatch"):
        dcgh_loss(x, torch.randn(4, 32), torch.ones(4, 3), torch.randn(3, 16))
    with pytest.raises(ValueError, match="proxies"):
        dcgh_loss(x, x, torch.ones(4, 3), torch.randn(5, 16))
    with pytest.raises(ValueError, match="all of global"):
        dcgh_loss(x, x, torch.ones(4, 3), torch.randn(3, 16), global_labels=torch.ones(4, 3))


def test_global_arguments_equal_to_local_batch_give_reference():
    torch.manual_seed(2)
    x, y = torch.randn(6, 16), torch.randn(6, 16)
    lab = (torch.rand(6, 4) < 0.5).float()
    lab[:, 1] = 1
    p = torch.randn(4, 16)
    a = dcgh_loss(x, y, lab, p)
    b = dcgh_loss(x, y, lab, p, global_image_codes=x, global_text_codes=y, global_labels=lab)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_proxy_init_matches_reference_recipe():
    # reference: torch.manual_seed(seed); randn; kaiming_normal_(fan_out); tanh
    torch.manual_seed(0)
    ref = torch.randn(24, 64)
    torch.nn.init.kaiming_normal_(ref, mode="fan_out")
    ref = torch.tanh(ref)
    torch.testing.assert_close(init_proxies(24, 64, seed=0), ref)
    proxies = ClassProxies(24, 64, seed=0)
    opt = proxies.make_optimizer(LossConfig())
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"]) == (0.02, 0.9, 5e-4)
