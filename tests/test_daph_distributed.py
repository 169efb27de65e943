"""DAPH, N gloo workers == one process on the concatenated batch: loss values and gradients.

Real process groups (torch.multiprocessing + gloo on 127.0.0.1), the real DDP wrapper, the same
``distributed_daph_*`` functions a training loop calls, in float64. The workers' batches have
different sizes, so the global counts (not world_size x local ones) are what is tested.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcgh_dist.config import DAPHConfig, ModelConfig
from dcgh_dist.distributed import distributed_daph_hash_loss, distributed_daph_proxy_loss
from dcgh_dist.models import build_model
from dcgh_dist.models.daph import build_daph_proxy_nets
from dcgh_dist.ray_session import free_port

C, K, D, N_EXTRA = 5, 16, 12, 9
RULES = ("exact", "superset")
TOL = dict(rtol=1e-10, atol=1e-12)


def _sizes(world: int) -> list[int]:
    return [4 + r for r in range(world)]  # uneven on purpose


def _data(world: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = sum(_sizes(world))
    labels = (torch.rand(n, C, generator=g) < 0.3).double()
    labels[torch.arange(n), torch.randint(0, C, (n,), generator=g)] = 1
    labels[: n // 3] = torch.nn.functional.one_hot(labels[: n // 3].argmax(1), C).double()
    sign = lambda x: torch.where(x >= 0, 1.0, -1.0).double()  # noqa: E731
    # The batch is part of the anchors, as in the reference (every row has a positive).
    extra = (torch.rand(N_EXTRA, C, generator=g) < 0.4).double()
    return {
        "image": torch.randn(n, D, generator=g, dtype=torch.float64),
        "text": torch.randn(n, D + 2, generator=g, dtype=torch.float64),
        "labels": labels,
        "anchor_image": sign(torch.randn(n + N_EXTRA, K, generator=g)),
        "anchor_text": sign(torch.randn(n + N_EXTRA, K, generator=g)),
        "anchor_labels": torch.cat([labels, extra]),
        "class_codes": sign(torch.randn(C, K, generator=g)),
    }


def _model_cfg() -> ModelConfig:
    return ModelConfig(family="features", bits=K, hash_dropout=0.0, feature_hidden=(8,), feature_dropout=0.0)


def _proxy_nets():
    torch.manual_seed(1)
    # eval(): no dropout, so every worker's class codes are the same (see the wrapper's docstring)
    return build_daph_proxy_nets(_model_cfg(), C, image_feature_dim=D, text_feature_dim=D + 2,
                                 class_hidden=32).double().eval()


def _hasher():
    torch.manual_seed(2)
    return build_model(_model_cfg(), image_feature_dim=D, text_feature_dim=D + 2).double()


def _grads(model) -> dict[str, torch.Tensor]:
    return {k.replace("module.", ""): p.grad.detach().clone() for k, p in model.named_parameters()
            if p.grad is not None}


def _stage1(model, d, sl, cfg):
    out = model({"image_features": d["image"][sl], "text_features": d["text"][sl], "labels": d["labels"][sl]})
    return distributed_daph_proxy_loss(out["image_codes"], out["text_codes"], out["class_codes"],
                                       d["labels"][sl], cfg)


def _stage2(model, d, sl, cfg, rule):
    codes = model({"image_features": d["image"][sl]})["image_codes"]
    return distributed_daph_hash_loss(codes, d["labels"][sl], d["anchor_image"], d["anchor_text"],
                                      d["anchor_labels"], d["class_codes"], cfg, rule)


def _worker(rank: int, world: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        d, cfg = _data(world), DAPHConfig()
        start = sum(_sizes(world)[:rank])
        sl = slice(start, start + _sizes(world)[rank])
        out = {}
        ddp = torch.nn.parallel.DistributedDataParallel(_proxy_nets())
        loss, logged = _stage1(ddp, d, sl, cfg)
        loss.backward()
        out["stage1"] = (logged, _grads(ddp))
        for rule in RULES:
            # Stage 2 trains one modality at a time: the other tower gets no gradient.
            ddp = torch.nn.parallel.DistributedDataParallel(_hasher(), find_unused_parameters=True)
            loss, logged = _stage2(ddp, d, sl, cfg, rule)
            loss.backward()
            out[rule] = (logged, _grads(ddp))
        # A row without labels on the last worker: every worker raises, none is left waiting.
        d["labels"][sl.stop - 1] = 0 if rank == world - 1 else d["labels"][sl.stop - 1]
        errors = []
        for fn in (lambda: _stage1(_proxy_nets(), d, sl, cfg), lambda: _stage2(_hasher(), d, sl, cfg, "exact")):
            try:
                fn()
                errors.append(None)
            except ValueError as e:
                errors.append(str(e))
        out["errors"] = errors
        results[rank] = out
    finally:
        dist.destroy_process_group()


def _run(world: int):
    ctx = mp.get_context("spawn")
    with ctx.Manager() as mgr:
        results = mgr.dict()
        mp.start_processes(_worker, args=(world, free_port(), results), nprocs=world, join=True,
                           start_method="spawn")
        return dict(results)


def _single(world: int):
    d, cfg = _data(world), DAPHConfig()
    out = {}
    model = _proxy_nets()
    loss, logged = _stage1(model, d, slice(None), cfg)
    loss.backward()
    out["stage1"] = (logged, _grads(model))
    for rule in RULES:
        model = _hasher()
        loss, logged = _stage2(model, d, slice(None), cfg, rule)
        loss.backward()
        out[rule] = (logged, _grads(model))
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
def test_workers_equal_one_process_on_the_concatenated_batch(world):
    results = _run(world)
    ref = _single(world)
    # The reference itself is well defined: some rows have partial anchors, some do not.
    assert ref["superset"][0]["partial_img"] > 0
    for rank in range(world):
        for stage in ("stage1", *RULES):
            logged, grads = results[rank][stage]
            ref_logged, ref_grads = ref[stage]
            assert set(logged) == set(ref_logged)
            for k, v in ref_logged.items():
                assert logged[k] == pytest.approx(v, rel=1e-10, abs=1e-12), (rank, stage, k)
            assert set(grads) == set(ref_grads) and grads, (rank, stage)
            for k, g in ref_grads.items():
                torch.testing.assert_close(grads[k], g, **TOL, msg=f"rank {rank} {stage} grad {k}")
        assert all(e is not None for e in results[rank]["errors"]), (rank, results[rank]["errors"])
    # The worker holding the row names it; the others say it is elsewhere.
    assert "1 of" in results[world - 1]["errors"][0]
    assert "other workers" in results[0]["errors"][1]
