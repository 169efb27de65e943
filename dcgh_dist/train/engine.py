"""Two training engines behind one interface: torch DDP and DeepSpeed.

The loop calls ``forward``, ``backward``, ``step`` and the checkpoint methods and never asks which
engine it has. Both average gradients over data-parallel workers, clip, accumulate and follow the
warmup-cosine schedule of ``OptimConfig``. The class proxies stay outside either engine: they are
tiny, fp32, and have their own SGD (as in the authors' code), so the loop all-reduces their
gradients itself (``dcgh_dist.distributed.all_reduce_grads``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from dcgh_dist.config import Config
from dcgh_dist.train.optim import build_optimizer, build_scheduler, param_groups, warmup_cosine

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Engine:
    """Interface; see TorchEngine / DeepSpeedEngine."""

    module: nn.Module  # the unwrapped model

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def backward(self, loss: Tensor) -> None:
        raise NotImplementedError

    def step(self) -> bool:
        """Advance one micro-batch; returns True when an optimizer step happened."""
        raise NotImplementedError

    def grad_scale(self) -> float:
        """Factor by which backward scaled the gradients (fp16 loss scaling), to unscale the
        proxies' gradients with."""
        return 1.0

    def lr(self) -> float:
        raise NotImplementedError

    def state_for_checkpoint(self) -> dict[str, Any]:
        """Optimizer/scheduler state saved by rank 0 (torch engine); DeepSpeed saves its own."""
        return {}

    def save_engine_state(self, directory: str) -> None:
        """Called on every rank (DeepSpeed writes per-rank ZeRO partitions)."""

    def load(self, directory: str, train_state: dict[str, Any] | None) -> None:
        raise NotImplementedError

    def export_state_dict(self) -> dict[str, Tensor]:
        """Full fp32 model weights (call on every rank: ZeRO-3 gathers)."""
        raise NotImplementedError


def _cast_floats(batch: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() and k != "labels" else v for k, v in batch.items()}


class TorchEngine(Engine):
    """DDP (via Ray Train's ``prepare_model``), AdamW, LambdaLR, optional bf16 autocast."""

    def __init__(self, model: nn.Module, cfg: Config, total_steps: int, world: int):
        import ray.train.torch

        self.cfg = cfg
        self.module = model
        self.optimizer = build_optimizer(model, cfg.optim, world)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, total_steps)
        self.model = ray.train.torch.prepare_model(model)
        self.device = next(model.parameters()).device
        self.accum = cfg.train.grad_accum_steps
        self._micro = 0
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._autocast = (
            torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
            if cfg.train.precision == "bf16" else contextlib.nullcontext()
        )

    def forward(self, batch):
        with self._autocast:
            out = self.model(batch)
        return {k: v.float() for k, v in out.items()}

    def backward(self, loss):
        (loss / self.accum).backward()

    def step(self) -> bool:
        self._micro += 1
        if self._micro % self.accum:
            return False
        if self.cfg.optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[-1]

    def state_for_checkpoint(self):
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load(self, directory, train_state):
        if train_state:
            self.optimizer.load_state_dict(train_state["optimizer"])
            self.scheduler.load_state_dict(train_state["scheduler"])

    def export_state_dict(self):
        return {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """Our config -> DeepSpeed's. The optimizer is AdamW with ``torch_adam`` (no fused-kernel
    build); the schedule is our LambdaLR, handed to ``deepspeed.initialize``."""
    o, t = cfg.optim, cfg.train
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": o.max_grad_norm if o.max_grad_norm > 0 else 0.0,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": o.head_lr, "betas": list(o.betas), "eps": o.eps,
                       "weight_decay": o.weight_decay, "torch_adam": True},
        },
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` over the process group Ray Train already set up (gloo on CPU,
    NCCL on GPU)."""

    TAG = "state"

    def __init__(self, model: nn.Module, cfg: Config, total_steps: int, world: int):
        import ray.train.torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        self.cfg = cfg
        self.module = model
        device = ray.train.torch.get_device()
        model.to(device)
        groups = [{k: v for k, v in g.items() if k != "name"} for g in param_groups(model, cfg.optim, world)]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            config=deepspeed_config(cfg),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: warmup_cosine(s, total_steps, cfg.optim.warmup_fraction)
                if cfg.optim.schedule == "warmup_cosine" else 1.0),
            dist_init_required=False,
        )
        self.dtype = _DTYPES[cfg.train.precision]

    def forward(self, batch):
        out = self.engine(_cast_floats(batch, self.dtype))
        return {k: v.float() for k, v in out.items()}

    def backward(self, loss):
        self.engine.backward(loss)  # divides by gradient_accumulation_steps itself

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary and self.engine.was_step_applied()

    def grad_scale(self) -> float:
        if self.cfg.train.precision != "fp16":
            return 1.0
        opt = self.engine.optimizer
        return float(getattr(opt, "loss_scale", None) or getattr(opt, "cur_scale", 1.0))

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[-1]

    def save_engine_state(self, directory: str) -> None:
        self.engine.save_checkpoint(os.path.join(directory, "deepspeed"), tag=self.TAG)

    def load(self, directory, train_state):
        path = os.path.join(directory, "deepspeed")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{directory}: no DeepSpeed state to resume from (was it trained with DDP?)")
        self.engine.load_checkpoint(path, tag=self.TAG, load_optimizer_states=True, load_lr_scheduler_states=True)

    def export_state_dict(self):
        if self.cfg.train.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # gathers on every rank
        else:
            state = self.engine.module.state_dict()
        # bf16/fp16 training keeps 16-bit module weights; the export is cast back to fp32 so any
        # consumer (evaluation, encoding, serving) loads it into an fp32 model.
        return {k: v.detach().float().cpu() for k, v in (state or {}).items()}


def build_engine(model: nn.Module, cfg: Config, total_steps: int, world: int) -> Engine:
    if cfg.train.engine == "deepspeed":
        return DeepSpeedEngine(model, cfg, total_steps, world)
    return TorchEngine(model, cfg, total_steps, world)
