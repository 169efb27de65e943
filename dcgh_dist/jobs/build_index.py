"""Build sharded FAISS binary indexes from code shards (Parquet ``id`` + ``code``), as Ray tasks.

    python jobs/build_index.py --codes codes/demo/image --output indexes/demo-image --index flat
    python jobs/build_index.py --codes s3://bucket/codes/coco/text --output s3://bucket/idx/coco-text \\
        --index ivf --nlist 4096 --nprobe 32 --shard-size 20000000 --s3-endpoint http://127.0.0.1:9000

A live index (docs/INDEX.md, "A live index"): each of these commits a new manifest version and
prints the immutable ``manifest-<build_id>.json`` a server can be pointed at:

    python jobs/build_index.py --codes codes/new/image --output indexes/demo-image --append
    python jobs/build_index.py --output indexes/demo-image --delete gone.parquet   # an ``id`` column
    python jobs/build_index.py --output indexes/demo-image --compact

``--labels DATASET`` stores each shard's labels beside it, for label-filtered search.

Index types: ``flat`` (exact), ``ivf`` (IndexBinaryIVF, approximate, fast at large N),
``multihash`` (IndexBinaryMultiHash: exact radius search up to nhash * (nflip + 1) - 1). Writes
``OUTPUT/shards/<build>/shard-NNNNN.faissindex`` and, last and atomically, ``OUTPUT/manifest.json``
(bits, type and parameters, every shard's URI, rows, id range and sha256, the model fingerprint
and config). A rebuild keeps the shards of ``--keep-builds`` builds (default 2: the new one and the
previous one, for servers still reading the previous manifest) and refuses to run while another
build holds ``OUTPUT/build.lock``. Search it with ``dcgh_dist.index.ShardedIndex.open(OUTPUT)``;
see docs/INDEX.md.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Sequence

logger = logging.getLogger(__name__)


# The flags are shorthands for keys of the config tree (section ``index``).
FLAGS = {
    "index": "index.index_type", "shard_size": "index.shard_size", "nlist": "index.nlist",
    "nprobe": "index.nprobe", "train_size": "index.train_size", "mh_nhash": "index.mh_nhash",
    "mh_bits_per_hash": "index.mh_bits_per_hash", "mh_nflip": "index.mh_nflip", "seed": "index.seed",
    "task_cpus": "index.task_cpus", "keep_builds": "index.keep_builds",
}
# What this job reads of the tree: an override of anything else would be ignored, so it is refused.
READS = ("index", "ray", "data.s3_endpoint")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from dcgh_dist.cli import add_config_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codes", help="directory / s3:// prefix of code shards (or one .parquet); needed to "
                                   "build or --append")
    p.add_argument("--output", required=True, help="index directory or s3:// prefix")
    op = p.add_mutually_exclusive_group()
    op.add_argument("--append", action="store_true",
                    help="add the codes to the index at --output as new shards (its type, parameters and "
                         "model); ids it holds live are refused")
    op.add_argument("--delete", metavar="IDS",
                    help="a Parquet file (or directory) with an 'id' column: tombstone those ids")
    op.add_argument("--compact", action="store_true",
                    help="rewrite shards with tombstones or below --shard-size as full shards")
    p.add_argument("--labels", metavar="DATASET",
                   help="the dataset the codes come from: its labels are stored per shard, for label "
                        "filters in search (an index with labels needs them on every --append)")
    p.add_argument("--index", choices=["flat", "ivf", "multihash"], help="index type (default flat)")
    p.add_argument("--shard-size", type=int, help="codes per index shard (default 10,000,000)")
    p.add_argument("--nlist", type=int, help="ivf: inverted lists (default 1024)")
    p.add_argument("--nprobe", type=int, help="ivf: lists searched per query (default 16)")
    p.add_argument("--train-size", type=int, help="ivf: training sample (default 64 * nlist)")
    p.add_argument("--mh-nhash", type=int, help="multihash: hash tables (default bits / 16)")
    p.add_argument("--mh-bits-per-hash", type=int, help="multihash: bits per table (default bits / nhash)")
    p.add_argument("--mh-nflip", type=int, help="multihash: bit flips probed (default 1)")
    p.add_argument("--seed", type=int)
    p.add_argument("--task-cpus", type=float, help="CPUs (FAISS threads) per build task (default 1)")
    p.add_argument("--keep-builds", type=int,
                   help="builds whose shards are kept, this one included (default 2: a reader of the "
                        "previous manifest keeps working); older builds of this index are deleted")
    p.add_argument("--checkpoint", help="the model's checkpoint: pins its fingerprint and config in the "
                                        "manifest (must match the codes' own, when they carry one)")
    add_config_arguments(p)
    args = p.parse_intermixed_args(argv)
    if args.codes is None and not (args.delete or args.compact):
        p.error("--codes is required to build an index or to --append to one")
    if args.codes is not None and (args.delete or args.compact):
        p.error("--delete and --compact change the index at --output and read no --codes")
    if args.labels and (args.delete or args.compact):
        p.error("--labels goes with a build or an --append")
    return args


def job_config(args: argparse.Namespace):
    """The config tree of the command line (--config, flags, overrides of what this job reads)."""
    from dcgh_dist.cli import config_from_args

    return config_from_args(args, FLAGS, reads=READS)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    from dcgh_dist.cli import setup_job_process

    setup_job_process(torch=False)  # before the library imports Ray; indexes need no model

    from dcgh_dist.index.build import build_index
    from dcgh_dist.ray_session import config_session

    tree = job_config(args)
    cfg, s3_endpoint = tree.index, tree.data.s3_endpoint
    if args.delete or args.compact:
        return _change(args, cfg, s3_endpoint)
    fingerprint = config = None
    if args.checkpoint:
        from dcgh_dist.models.checkpoint import verified_meta

        meta = verified_meta(args.checkpoint, s3_endpoint)  # before Ray starts
        fingerprint, config = meta.fingerprint, meta.config.to_dict()

    with config_session(tree.ray):
        manifest = build_index(args.codes, args.output, cfg, expected_fingerprint=fingerprint,
                               config=config, s3_endpoint=s3_endpoint, use_ray=True, append=args.append,
                               labels_uri=args.labels)
    return _report(args, manifest)


def _change(args: argparse.Namespace, cfg, s3_endpoint: str | None) -> dict:
    """--delete / --compact: in this process (they read and write only what changes), no Ray."""
    from dcgh_dist.index.update import compact_index, delete_ids, read_id_list

    from dcgh_dist.config import IndexConfig

    # The index keeps its own settings; only what the user set (flag, override or --config) changes them.
    default = IndexConfig()
    keep = cfg.keep_builds if cfg.keep_builds != default.keep_builds else None
    if args.delete:
        manifest, result = delete_ids(args.output, read_id_list(args.delete, s3_endpoint), keep_builds=keep,
                                      s3_endpoint=s3_endpoint)
        print(f"| ids given | deleted now | already deleted | not in the index |\n|---|---|---|---|\n"
              f"| {result.requested} | {result.deleted} | {result.already_deleted} | {result.not_found} |",
              flush=True)
        if result.not_found:
            print(f"not in the index (first {len(result.not_found_examples)}): {result.not_found_examples}",
                  flush=True)
        return {**_report(args, manifest), "delete": result.to_dict()}
    manifest = compact_index(args.output, shard_size=cfg.shard_size if cfg.shard_size != default.shard_size else None,
                             keep_builds=keep, s3_endpoint=s3_endpoint)
    return _report(args, manifest)


def _report(args: argparse.Namespace, manifest) -> dict:
    from dcgh_dist.index.manifest import manifest_location, version_manifest_name
    from dcgh_dist.storage import join

    size = sum(s.bytes for s in manifest.shards)
    print(f"| version | operation | index | shards | codes | live | bits | bytes/item | model | seconds |\n"
          f"|---|---|---|---|---|---|---|---|---|---|\n"
          f"| {manifest.version} | {manifest.operation} | {manifest.index.index_type} | {len(manifest.shards)} | "
          f"{manifest.num_items} | {manifest.num_live} | {manifest.bits} | "
          f"{size / max(1, manifest.num_items):.2f} | {manifest.model_fingerprint} | "
          f"{manifest.extra.get('build_seconds')} |", flush=True)
    out = manifest_location(args.output.rstrip("/"))
    print(f"manifest: {out}", flush=True)
    # What a server is pointed at to read exactly this version (serve deploy with user_config).
    print(f"this version: {join(out.rsplit('/', 1)[0], version_manifest_name(manifest.build_id))}", flush=True)
    return json.loads(manifest.to_json())

