"""Encoding throughput (items/s) of the tiny and ViT-B/32 image and text towers, CPU or GPU.

    python benchmarks/bench_encode.py                                # both presets
    python benchmarks/bench_encode.py --presets tiny --job-rows 2000
    python benchmarks/bench_encode.py --device cuda --batch 256      # a GPU node: GPU model actors

Two measurements per preset and modality, untrained weights (the compute is the same):

* **model**: the forward pass alone on one preprocessed batch, fp32 and bf16 autocast, with the
  measured share of bits on which bf16 agrees with fp32 (the encode job's bf16 criterion: >= 99.9%);
* **job**: ``run_encode`` (Ray Data: read, decode/tokenize tasks, model actor, shard writes,
  exactly-once check) over demo rows, run at two sizes: the marginal rate (extra rows / extra
  seconds) is the pipeline's throughput without the fixed start-up (Ray Data, worker processes,
  model load), which is reported separately.

Demo images are small PNGs (decode is cheaper than for real photos). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from typing import Sequence

from common import machine  # benchmarks/common.py: a script's own folder is on sys.path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_train.machine

logger = logging.getLogger("dcgh_dist.benchmarks.encode")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,vit-b-32")
    p.add_argument("--batch", type=int, default=64, help="rows per model call")
    p.add_argument("--job-rows", default="1000,5000", help="the two job sizes for tiny")
    p.add_argument("--job-rows-large", default="64,320", help="the two job sizes for ViT-B/32")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "dcgh-bench-encode"))
    p.add_argument("--skip-job", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--json", help="append results as JSON lines here")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available); "
                   "cuda also gives the job's model actors a GPU each")
    return p.parse_args(argv)


def make_checkpoint(path: str, preset: str, info) -> str:
    from dcgh_dist.config import Config, ModelConfig
    from dcgh_dist.models.checkpoint import save_untrained

    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    return save_untrained(path, Config(model=ModelConfig(clip_preset=preset, bits=64)), info)


def model_throughput(ckpt: str, dataset: str, batch: int, device: str = "cpu") -> list[dict]:
    """Forward-only items/s per modality, fp32 and bf16 autocast, and bf16 bit agreement."""
    import glob

    import pyarrow.parquet as pq
    import torch

    from dcgh_dist.models.encoder import Encoder

    encoders = {p: Encoder.from_checkpoint(ckpt, device=device, precision=p) for p in ("fp32", "bf16")}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    table = pq.read_table(sorted(glob.glob(os.path.join(dataset, "*.parquet")))[0]).slice(0, batch)
    rows = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("id", "image", "text")}
    x = encoders["fp32"].preprocessor(("image", "text"))(rows)
    out = []
    for mod in ("image", "text"):
        inp = torch.as_tensor(x[mod]).to(device)
        res = {"modality": mod, "threads": torch.get_num_threads(), "batch": batch}
        for precision, enc in encoders.items():
            enc.relaxed(mod, inp)  # warm-up
            sync()
            reps, t0 = 0, time.perf_counter()
            while reps < 2 or time.perf_counter() - t0 < 3.0:
                enc.relaxed(mod, inp)
                reps += 1
            sync()  # GPU kernels run asynchronously: time their completion, not their launch
            res[f"{precision}_items_s"] = reps * batch / (time.perf_counter() - t0)
        res["bf16_bit_agreement"] = encoders["fp32"].bit_agreement(mod, inp)
        out.append(res)
    return out


def job_seconds(ckpt: str, dataset: str, work: str, modality: str, batch: int,
                use_gpu: bool = False) -> tuple[int, float]:
    import shutil

    from dcgh_dist.config import EncodeConfig
    from dcgh_dist.encoding import run_encode

    out = os.path.join(work, f"codes-{os.path.basename(ckpt)}-{modality}")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    r = run_encode(ckpt, dataset, out, (modality,),
                   EncodeConfig(batch_size=batch, actor_cpus=os.cpu_count() or 1, precision="fp32",
                                use_gpu=use_gpu))
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return r.input_rows, seconds


def subset(data: str, info, n: int, work: str) -> str:
    """The first ``n`` rows of the demo set, in files of 250 rows."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dcgh_dist.data.format import write_dataset

    out = os.path.join(work, f"subset-{n}")
    if not os.path.exists(os.path.join(out, "dataset.json")):
        t = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(os.path.join(data, "*.parquet")))])
        write_dataset(out, info, t.slice(0, n), rows_per_file=250)
    return out


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from dcgh_dist.data.demo import generate_demo_dataset
    from dcgh_dist.data.format import read_dataset_info

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.work_dir, exist_ok=True)
    sizes = {"tiny": [int(x) for x in args.job_rows.split(",")],
             "vit-b-32": [int(x) for x in args.job_rows_large.split(",")]}
    rows_needed = max(max(v) for v in sizes.values())
    data = os.path.join(args.work_dir, f"demo-{rows_needed}")
    if not os.path.exists(os.path.join(data, "dataset.json")):
        generate_demo_dataset(data, size=rows_needed, seed=0, rows_per_file=250)
    info = read_dataset_info(data)
    results: list[dict] = []
    presets = [p.strip() for p in args.presets.split(",")]
    for preset in presets:
        ckpt = make_checkpoint(os.path.join(args.work_dir, f"ckpt-{preset}"), preset, info)
        if args.skip_model:
            continue
        for r in model_throughput(ckpt, data, args.batch, device):
            results.append({"preset": preset, "kind": "model", **r})
            logger.info("%s", results[-1])

    if not args.skip_job:
        from dcgh_dist.ray_session import quiet_progress, ray_session

        with ray_session():
            quiet_progress()
            for preset in presets:
                ckpt = os.path.join(args.work_dir, f"ckpt-{preset}")
                small, large = sizes.get(preset, sizes["vit-b-32"])
                for mod in ("image", "text"):
                    # Warm-up: the first job on a fresh Ray pays for starting worker processes and
                    # importing torch in them, which later jobs reuse; untimed, or it would make the
                    # small run look slow and the marginal rate meaningless.
                    def job(rows: int) -> tuple[int, float]:
                        return job_seconds(ckpt, subset(data, info, rows, args.work_dir), args.work_dir, mod,
                                           args.batch, device.startswith("cuda"))

                    job(small)
                    (n1, t1), (n2, t2) = job(small), job(large)
                    rate = (n2 - n1) / (t2 - t1) if t2 > t1 else float("nan")
                    results.append({"preset": preset, "kind": "job", "modality": mod, "rows": [n1, n2],
                                    "seconds": [round(t1, 1), round(t2, 1)], "marginal_items_s": rate,
                                    "job_items_s": n2 / t2, "fixed_s": t1 - n1 / rate if rate == rate else None})
                    logger.info("%s", results[-1])


    print(f"\nMachine: {machine()}; model on {device}, {torch.get_num_threads()} torch threads, "
          f"batch {args.batch}")
    print("\n| preset | tower | fp32 items/s | bf16 items/s | bf16 bit agreement |")
    print("|---|---|---|---|---|")
    for r in results:
        if r["kind"] == "model":
            print(f"| {r['preset']} | {r['modality']} | {r['fp32_items_s']:,.1f} | {r['bf16_items_s']:,.1f} | "
                  f"{100 * r['bf16_bit_agreement']:.2f}% |")
    jobs = [r for r in results if r["kind"] == "job"]
    if jobs:
        print("\n| preset | tower | rows | job seconds | marginal items/s | whole job items/s (larger run) | fixed start-up s |")
        print("|---|---|---|---|---|---|---|")
        for r in jobs:
            fixed = f"{r['fixed_s']:.1f}" if r["fixed_s"] is not None else "-"
            print(f"| {r['preset']} | {r['modality']} | {r['rows'][0]} / {r['rows'][1]} | "
                  f"{r['seconds'][0]} / {r['seconds'][1]} | {r['marginal_items_s']:,.1f} | "
                  f"{r['job_items_s']:,.1f} | {fixed} |")
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return results


if __name__ == "__main__":
    main()
