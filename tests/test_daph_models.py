"""DAPH stage-1 networks: shapes, unit codes, the reference's frozen layers, the class-net init."""

from __future__ import annotations

import pytest
import torch

from dcgh_dist.config import ModelConfig
from dcgh_dist.losses import daph_proxy_loss
from dcgh_dist.models.daph import ClassNet, DAPHProxyNets, LabelProxyEncoder, build_daph_proxy_nets
from dcgh_dist.models.towers import FeatureTower

B, C, K, D = 5, 7, 32, 24


def _labels(seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(B, C, generator=g) < 0.3).float()
    y[torch.arange(B), torch.randint(0, C, (B,), generator=g)] = 1
    return y


def _unit(x):
    torch.testing.assert_close(x.norm(dim=1), torch.ones(x.shape[0]), rtol=1e-5, atol=1e-5)


def test_label_proxy_encoder_gives_unit_codes():
    torch.manual_seed(0)
    enc = LabelProxyEncoder(FeatureTower(D, (16,)), C, K)
    out = enc(torch.randn(B, D), _labels())
    assert out.shape == (B, K)
    _unit(out)
    assert enc.proj.in_features == 16 and enc.proj.out_features == 512  # the tower's out_dim
    assert [type(m) for m in enc.label_mlp] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Dropout, torch.nn.Linear]
    assert enc.label_mlp[2].p == 0.1


def test_label_proxy_encoder_needs_a_feature_dim():
    with pytest.raises(ValueError, match="feature_dim"):
        LabelProxyEncoder(torch.nn.Identity(), C, K)
    assert LabelProxyEncoder(torch.nn.Identity(), C, K, feature_dim=D)(torch.randn(B, D), _labels()).shape == (B, K)


def test_labels_change_the_code():
    torch.manual_seed(0)
    enc = LabelProxyEncoder(FeatureTower(D, (16,)), C, K).eval()
    x = torch.randn(B, D)
    assert not torch.allclose(enc(x, _labels(0)), enc(x, _labels(1)))


def test_freeze_reference_layers_freezes_proj_label_mlp_and_code_only():
    torch.manual_seed(0)
    enc = LabelProxyEncoder(FeatureTower(D, (16,)), C, K, freeze_reference_layers=True)
    frozen = {n for n, p in enc.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in enc.named_parameters() if n.split(".")[0] in ("proj", "label_mlp", "code")}
    assert all(p.requires_grad for p in enc.backbone.parameters())
    enc(torch.randn(B, D), _labels()).sum().backward()
    # The backbone still learns through the frozen layers.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.backbone.parameters()
               if p.dim() > 1)
    assert all(p.grad is None for n, p in enc.named_parameters() if n in frozen)


def test_class_net_unit_codes_and_init():
    torch.manual_seed(0)
    net = ClassNet(C, K, hidden=1024)
    p = net()
    assert p.shape == (C, K)
    _unit(p)
    assert net.net[0].weight.shape == (1024, C) and net.net[3].weight.shape == (K, 1024)
    assert net.net[2].p == 0.2
    for layer in (net.net[0], net.net[3]):
        assert layer.weight.std().item() == pytest.approx(0.2, rel=0.05)
        assert layer.weight.mean().abs().item() < 0.02
    assert ClassNet(C, K).net[0].out_features == 4096  # the reference width by default


def test_build_reuses_the_project_towers_and_feeds_the_loss():
    torch.manual_seed(0)
    cfg = ModelConfig(family="features", bits=K, feature_hidden=(16,))
    nets = build_daph_proxy_nets(cfg, C, image_feature_dim=D, text_feature_dim=D + 3,
                                 freeze_reference_layers=True, class_hidden=64)
    assert isinstance(nets, DAPHProxyNets)
    assert isinstance(nets.image.backbone, FeatureTower) and isinstance(nets.text.backbone, FeatureTower)
    # The reference freezes layers of the image proxy net only.
    assert not nets.image.code.weight.requires_grad and nets.text.code.weight.requires_grad
    batch = {"image_features": torch.randn(B, D), "text_features": torch.randn(B, D + 3), "labels": _labels()}
    out = nets(batch)
    assert set(out) == {"image_codes", "text_codes", "class_codes"}
    assert out["image_codes"].shape == out["text_codes"].shape == (B, K) and out["class_codes"].shape == (C, K)
    for v in out.values():
        _unit(v)
    terms = daph_proxy_loss(out["image_codes"], out["text_codes"], out["class_codes"], batch["labels"], None)
    terms["total"].backward()
    assert torch.isfinite(terms["total"])
    assert nets.classes.net[0].weight.grad is not None and nets.text.code.weight.grad is not None
