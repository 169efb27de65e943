"""N gloo workers x B == one process x N*B: loss value and gradients of heads and proxies.

Real process groups (torch.multiprocessing + gloo on 127.0.0.1), the real DDP wrapper, and the
same ``distributed_dcgh_loss`` the training loop calls.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcgh_dist.config import LossConfig, ModelConfig
from dcgh_dist.distributed import all_reduce_grads, distributed_dcgh_loss
from dcgh_dist.losses import ClassProxies
from dcgh_dist.models import build_model
from dcgh_dist.ray_session import free_port

B, C, K, D = 6, 5, 32, 24


def _make(world: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = world * B
    feats_i = torch.randn(n, D, generator=g, dtype=torch.float64)
    feats_t = torch.randn(n, D, generator=g, dtype=torch.float64)
    labels = (torch.rand(n, C, generator=g) < 0.35).double()
    labels[torch.arange(n), torch.randint(0, C, (n,), generator=g)] = 1  # >= 1 label each
    torch.manual_seed(seed)
    model = build_model(ModelConfig(family="features", bits=K, hash_dropout=0.0, feature_hidden=(16,),
                                    feature_dropout=0.0), image_feature_dim=D, text_feature_dim=D).double()
    proxies = ClassProxies(C, K).double()
    return feats_i, feats_t, labels, model, proxies


def _grads(model, proxies):
    out = {f"model.{k}": p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    out["proxies"] = proxies.weight.grad.detach().clone()
    return out


def _worker(rank: int, world: int, port: int, gather: str, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fi, ft, lab, model, proxies = _make(world)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        sl = slice(rank * B, (rank + 1) * B)
        codes = ddp({"image_features": fi[sl], "text_features": ft[sl]})
        loss, logged = distributed_dcgh_loss(codes["image_codes"], codes["text_codes"], lab[sl],
                                             proxies(), LossConfig(gather=gather))
        loss.backward()
        all_reduce_grads(proxies.parameters())
        results[rank] = (logged, {k.replace("module.", ""): v for k, v in _grads(ddp.module, proxies).items()})
    finally:
        dist.destroy_process_group()


def _single(world: int):
    fi, ft, lab, model, proxies = _make(world)
    codes = model({"image_features": fi, "text_features": ft})
    loss, logged = distributed_dcgh_loss(codes["image_codes"], codes["text_codes"], lab, proxies(), LossConfig())
    loss.backward()
    return logged, _grads(model, proxies)


def _run(world: int, gather: str = "global"):
    ctx = mp.get_context("spawn")
    with ctx.Manager() as mgr:
        results = mgr.dict()
        mp.start_processes(_worker, args=(world, free_port(), gather, results), nprocs=world,
                           join=True, start_method="spawn")
        return dict(results)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
def test_global_loss_and_gradients_equal_single_process(world):
    results = _run(world)
    ref_logged, ref_grads = _single(world)
    for rank in range(world):
        logged, grads = results[rank]
        for k, v in ref_logged.items():
            assert logged[k] == pytest.approx(v, rel=1e-5, abs=1e-9), (rank, k)
        assert set(grads) == set(ref_grads)
        for k, g in ref_grads.items():
            torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-9, msg=f"rank {rank} grad {k}")


@pytest.mark.timeout(300)
def test_local_only_losses_differ_from_global():
    """The comparison switch: local-only pair terms see fewer pairs, so the value differs."""
    results = _run(2, gather="local")
    ref_logged, _ = _single(2)
    assert results[0][0]["total"] != pytest.approx(ref_logged["total"], rel=1e-5)
