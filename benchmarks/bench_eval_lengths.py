"""Evaluation's two sharings: every code length from one pass against one pass per length, and a
checkpoint with its untrained baseline from one read of the data against one read each.

    python benchmarks/bench_eval_lengths.py                       # demo, model.bits=[16,32,64]
    python benchmarks/bench_eval_lengths.py --dataset demo-features --bits 16 32 64 128 --repeats 3

``jobs/train.py`` scores a multi-length run (and its untrained baseline) with
``dcgh_dist.evaluation.evaluate``, which reads the query and database splits and runs the towers
once for every length. The baseline here is what it did before: one ``evaluate`` per length, each a
Ray Data pipeline and a tower pass of its own. Both run in this process on one local cluster,
alternating, on the untrained checkpoint of the dataset's training preset (the compute is that of
a trained one); the metrics of both must be identical. Then the same for the checkpoint and the
untrained model of its config (what ``jobs/train.py`` reports beside the trained one): one
``evaluate`` each against both models in one pipeline, which decodes the images once and runs
each model's towers on the same batches. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

from common import machine  # benchmarks/common.py: a script's own folder is on sys.path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="demo")
    p.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import torch  # noqa: F401

    from dcgh_dist.config import load_config
    from dcgh_dist.data.format import scan_dataset
    from dcgh_dist.data.presets import TRAIN_PRESETS, resolve_dataset
    from dcgh_dist.evaluation import evaluate
    from dcgh_dist.models import resolve_family
    from dcgh_dist.models.checkpoint import save_untrained
    from dcgh_dist.ray_session import ray_session

    # the preset a plain `jobs/train.py --dataset D` run uses
    cfg = load_config(preset=TRAIN_PRESETS.get(args.dataset, {}),
                      overrides=[f"data.dataset={args.dataset}", f"model.bits={list(args.bits)}"])
    uri = resolve_dataset(cfg.data)
    scan = scan_dataset(uri)
    cfg = dataclasses.replace(cfg, model=resolve_family(cfg.model, scan.info))  # towers follow the data
    ckpt = save_untrained(tempfile.mkdtemp(prefix="bench-eval-lengths-"), cfg, scan.info)

    times: dict[str, list[float]] = {"one pass per length": [], "one pass for every length": [],
                                     "checkpoint and untrained model, a pipeline each": [],
                                     "checkpoint and untrained model, one pipeline": []}
    models = {"checkpoint": ckpt, "untrained": None}
    with ray_session(None, num_cpus=max(4, os.cpu_count() or 1)):
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            separate = {k: evaluate(uri, scan.info, cfg, {"m": ckpt}, scan.files, lengths=[k])["m"][k] for k in args.bits}
            times["one pass per length"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            together = evaluate(uri, scan.info, cfg, {"m": ckpt}, scan.files)["m"]
            times["one pass for every length"].append(time.perf_counter() - t0)
            for k in args.bits:
                if separate[k][0] != together[k][0]:
                    raise SystemExit(f"{k} bits: the metrics differ between the two ways")
            t0 = time.perf_counter()
            each = {name: evaluate(uri, scan.info, cfg, {name: c}, scan.files)[name] for name, c in models.items()}
            times["checkpoint and untrained model, a pipeline each"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            shared = evaluate(uri, scan.info, cfg, models, scan.files)
            times["checkpoint and untrained model, one pipeline"].append(time.perf_counter() - t0)
            if any(each[m][k][0] != shared[m][k][0] for m in models for k in args.bits):
                raise SystemExit("the metrics differ between one pipeline per model and one for both")

    n = scan.split_counts
    print(f"\nmachine: {machine()}")
    print(f"`evaluate` of an untrained `{args.dataset}` checkpoint with model.bits={list(args.bits)}: "
          f"{n.get('query', 0)} queries, {sum(n.values()) - n.get('query', 0)} database rows; "
          f"{args.repeats} alternating repeats, mean ± std; identical metrics both ways\n")
    print("| evaluation | seconds | ratio to the first of its pair |")
    print("|---|---|---|")
    names = list(times)
    for i, name in enumerate(names):
        ts, base = times[name], statistics.mean(times[names[i - i % 2]])
        sd = f" ± {statistics.stdev(ts):.1f}" if len(ts) > 1 else ""
        print(f"| {name} | {statistics.mean(ts):.1f}{sd} | {statistics.mean(ts) / base:.2f} |")


if __name__ == "__main__":
    main()
