"""Training-step throughput (pairs/s) of the model presets, in plain torch (no Ray).

Times the exact step the Ray Train loop runs: both towers forward, DCGH loss, backward, gradient
clipping, AdamW + the proxies' SGD. fp32 vs bf16 autocast, on CPU or a GPU if present. Prints a
markdown table; bf16 is reported as a ratio against fp32 measured in the same process.

    python benchmarks/bench_train.py                       # tiny and vit-b-32 on CPU
    python benchmarks/bench_train.py --presets tiny --batch-size 64 --steps 10
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Sequence

from common import machine  # benchmarks/common.py: a script's own folder is on sys.path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def time_steps(preset: str, batch_size: int, steps: int, warmup: int, dtype: str, device: str) -> float:
    import torch

    from dcgh_dist.config import LossConfig, ModelConfig, OptimConfig
    from dcgh_dist.losses import ClassProxies, dcgh_loss
    from dcgh_dist.models import build_model
    from dcgh_dist.models.towers import CLIP_PRESETS
    from dcgh_dist.train.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model(ModelConfig(clip_preset=preset, bits=64)).to(device).train()
    proxies = ClassProxies(24, 64).to(device)
    opt = build_optimizer(model, OptimConfig())
    popt = proxies.make_optimizer(LossConfig())
    size = CLIP_PRESETS[preset].image_size
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch_size, 3, size, size, generator=g).to(device)
    text = torch.randint(1, 49000, (batch_size, 32), generator=g)
    text[:, 0], text[:, 20] = 49406, 49407
    text[:, 21:] = 0
    text = text.to(device)
    labels = (torch.rand(batch_size, 24, generator=g) < 0.12).float()
    labels[torch.arange(batch_size), torch.randint(0, 24, (batch_size,), generator=g)] = 1
    labels = labels.to(device)
    autocast = (torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
                if dtype == "bf16" else contextlib.nullcontext())
    params = [p for group in opt.param_groups for p in group["params"]]

    def step():
        with autocast:
            out = model({"image": image, "text": text})
        terms = dcgh_loss(out["image_codes"].float(), out["text_codes"].float(), labels, proxies())
        opt.zero_grad(set_to_none=True)
        popt.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        popt.step()

    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "vit-b-32"])
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 for tiny, 16 for vit-b-32 on CPU, 128 on GPU")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = p.parse_args(argv)

    rows = []
    for preset in args.presets:
        bs = args.batch_size or (128 if args.device.startswith("cuda") else (64 if preset == "tiny" else 16))
        base = None
        for dtype in args.dtypes:
            pps = time_steps(preset, bs, args.steps, args.warmup, dtype, args.device)
            base = base or pps
            rows.append({"preset": preset, "batch": bs, "dtype": dtype, "pairs_per_s": pps, "vs_fp32": pps / base})
            print(f"  {preset} {dtype} batch {bs}: {pps:.1f} pairs/s", flush=True)
    print(f"\nMachine: {machine()}, device {args.device}\n")
    print("| preset | batch | dtype | pairs/s | ratio vs fp32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['batch']} | {r['dtype']} | {r['pairs_per_s']:.1f} | {r['vs_fp32']:.2f} |")
    return rows


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
