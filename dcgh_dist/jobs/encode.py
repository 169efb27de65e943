"""Encode a dataset into binary code shards with a trained checkpoint (Ray Data, streaming).

    python jobs/encode.py --checkpoint runs/demo/checkpoint --dataset demo --modality both --output codes/demo
    python jobs/encode.py --checkpoint CKPT --dataset s3://bucket/coco --modality image \\
        --output s3://bucket/codes/coco --splits train,val,db --s3-endpoint http://127.0.0.1:9000
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/encode.py ...

Input: a dataset in the project's format (directory or s3:// prefix with dataset.json), or plain
Parquet (a file, directory or prefix) with ``id`` and an ``image``/``text`` column. Output, per
modality: ``OUTPUT/<modality>/part-NNNNN.parquet`` (``id`` int64, ``code`` fixed_size_binary(K/8)),
one per input file; rows that cannot be encoded (undecodable image, empty text) are listed in
``OUTPUT/skipped/<modality>/`` and counted. Re-running the same command after a crash finishes
the job: finished shards are kept. The job ends by checking that every input id appears exactly
once (encoded or skipped). See docs/INDEX.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Sequence

logger = logging.getLogger(__name__)


# The flags are shorthands for keys of the config tree (section ``encode``).
FLAGS = {
    "batch_size": "encode.batch_size", "concurrency": "encode.concurrency", "actor_cpus": "encode.actor_cpus",
    "preprocess_batch_size": "encode.preprocess_batch_size", "use_gpu": "encode.use_gpu",
    "precision": "encode.precision", "throttle_s": "encode.throttle_s", "splits": "encode.splits",
    "bits": "encode.bits", "relaxed": "encode.relaxed",
}
# What this job reads of the tree: an override of anything else would be ignored, so it is refused.
READS = ("encode", "ray", "data.s3_endpoint")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from dcgh_dist.cli import add_config_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or s3:// URI (model.pt + meta.json)")
    p.add_argument("--dataset", required=True,
                   help="dataset directory / s3:// prefix, plain Parquet file or prefix, a preset, or 'demo'")
    p.add_argument("--modality", choices=["image", "text", "both"], default="both")
    p.add_argument("--output", required=True, help="output directory or s3:// prefix")
    p.add_argument("--splits", help="comma-separated splits to encode (default: every row)")
    p.add_argument("--batch-size", type=int, help="rows per model call (default 256)")
    p.add_argument("--concurrency", type=int, help="model actors (default 1)")
    p.add_argument("--actor-cpus", type=float, help="CPUs (torch threads) per CPU actor (default 1)")
    p.add_argument("--preprocess-batch-size", type=int)
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--use-gpu", dest="use_gpu", action="store_true", default=None)
    gpu.add_argument("--no-gpu", dest="use_gpu", action="store_false")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    p.add_argument("--bits", type=int, help="code length of a multi-length checkpoint (default: its primary one)")
    p.add_argument("--relaxed", action="store_true", default=None,
                   help="also store the relaxed (tanh) codes, float16 (2 bytes/bit), for re-ranking search "
                        "results (jobs/build_index.py keeps them beside each shard)")
    p.add_argument("--throttle-s", type=float, help=argparse.SUPPRESS)  # testing aid
    p.add_argument("--json", help="also write the result as JSON here")
    add_config_arguments(p)
    return p.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    from dcgh_dist.cli import setup_job_process

    setup_job_process()  # before the library imports Ray

    from dataclasses import replace

    from dcgh_dist.cli import config_from_args
    from dcgh_dist.data.presets import resolve_dataset
    from dcgh_dist.encoding import run_encode
    from dcgh_dist.models.checkpoint import verified_meta
    from dcgh_dist.ray_session import config_session, quiet_progress

    tree = config_from_args(args, FLAGS, reads=READS)
    cfg = tree.encode
    # Everything checked before Ray starts: the weights against their fingerprint, the dataset.
    meta = verified_meta(args.checkpoint, tree.data.s3_endpoint)
    # unset: the endpoint the checkpoint's run read its data from
    s3_endpoint = tree.data.s3_endpoint or meta.config.data.s3_endpoint
    dataset = args.dataset
    if not (dataset.endswith(".parquet") or os.path.isfile(dataset)):
        # demo and presets as the checkpoint's run saw them (demo size and seed, data root)
        dataset = resolve_dataset(replace(meta.config.data, dataset=dataset, s3_endpoint=s3_endpoint))
    modalities = ("image", "text") if args.modality == "both" else (args.modality,)

    with config_session(tree.ray):
        quiet_progress()
        result = run_encode(args.checkpoint, dataset, args.output, modalities, cfg, s3_endpoint=s3_endpoint)
    out = json.loads(json.dumps(result.to_dict()))
    lines = [f"exactly-once check passed: {result.input_rows} input ids"]
    for m in result.modalities:
        lines.append(f"  {m}: {result.encoded[m]} encoded, {result.skipped[m]} skipped"
                     + (f" (e.g. {result.skipped_examples[m][0]})" if result.skipped_examples.get(m) else ""))
    lines.append(f"  files: {result.files_total} ({result.files_done_before} done before this run), "
                 f"precision {result.precision}, {result.seconds:.1f}s; output {result.output_uri}")
    print("\n".join(lines), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out

