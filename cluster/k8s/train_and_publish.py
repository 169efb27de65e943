"""Run jobs/train.py, then copy what it wrote to its --output-dir to an s3:// prefix.

    python cluster/k8s/train_and_publish.py --publish s3://bucket/runs/coco-v1 -- \\
        --dataset coco --output-dir /home/ray/dcgh-runs/coco-v1 data.s3_endpoint=http://minio:9000 ...

The RayJob dcgh-train's entrypoint. jobs/train.py writes its outputs (the checkpoint selected on
val, metrics.json, plots, config.yaml, run.json) to a local directory, and a RayJob's cluster,
with the head pod's disk, is deleted when the job ends: this wrapper publishes them where the
encode and index jobs and the endpoint read them, ``PUBLISH/checkpoint`` and so on. (The run's
Ray Train checkpoints already go to S3 through ``train.storage_path``.)

Everything after ``--`` is jobs/train.py's command line, parsed by its own parser before
anything runs. Files are written atomically, each ``meta.json`` last, so a reader never loads a
half-published checkpoint (its weights are verified against meta.json's fingerprint anyway).
Publishing over an earlier checkpoint is refused unless it is the same model (a retried RayJob
that resumed a finished run): a model that is served is never overwritten; a new model gets a new
prefix (a new DCGH_RUN, docs/DEPLOY.md). Nothing is deleted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("dcgh_dist.cluster.train_and_publish")


def train_job():
    """jobs/train.py as a module (it is a script, not a package member)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dcgh_jobs_train", REPO / "jobs" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(this script's arguments, jobs/train.py's argv); train's argv is checked by train's parser."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: train_and_publish.py --publish s3://BUCKET/PREFIX -- TRAIN_ARGS... "
                         "(jobs/train.py's arguments after --)")
    i = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--publish", required=True, help="s3:// prefix for the run's outputs")
    args = p.parse_args(argv[:i])
    if not args.publish.startswith("s3://"):
        p.error(f"--publish must be an s3:// prefix, got {args.publish!r}")
    train_argv = argv[i + 1:]
    train_job().parse_args(train_argv)  # a bad flag fails here, before anything runs
    return args, train_argv


def publish(local_dir: str, dest: str, s3_endpoint: str | None) -> list[str]:
    """Copy every file under ``local_dir`` to ``dest``; returns the URIs written."""
    from dcgh_dist.models.checkpoint import verified_meta
    from dcgh_dist.storage import exists, join, read_text, resolve_filesystem, write_bytes_atomic

    fs, base = resolve_filesystem(dest, s3_endpoint)
    local = Path(local_dir)
    # the export is whole and its weights match meta.json before anything leaves
    ours = verified_meta(str(local / "checkpoint")).fingerprint
    theirs_path = join(base, "checkpoint", "meta.json")
    if exists(fs, theirs_path):
        theirs = json.loads(read_text(fs, theirs_path)).get("fingerprint")
        if theirs != ours:
            raise ValueError(
                f"{dest}/checkpoint holds another model ({theirs}, this run made {ours}): a published "
                "model is never overwritten; publish this run under a new prefix (a new DCGH_RUN)")
    files = sorted(p for p in local.rglob("*") if p.is_file())
    # meta.json files last: a checkpoint becomes loadable only once its weights are there
    files.sort(key=lambda p: p.name == "meta.json")
    written = []
    for path in files:
        rel = path.relative_to(local).as_posix()
        write_bytes_atomic(fs, join(base, rel), path.read_bytes())
        written.append(f"{dest.rstrip('/')}/{rel}")
    return written


def main(argv: Sequence[str] | None = None) -> dict:
    args, train_argv = parse_args(argv)
    train = train_job()
    result = train.main(train_argv)
    cfg = train.build_config(train.parse_args(train_argv))
    written = publish(os.path.abspath(cfg.train.output_dir), args.publish, cfg.data.s3_endpoint)
    print(f"published {len(written)} files to {args.publish} (checkpoint: {args.publish.rstrip('/')}/checkpoint)",
          flush=True)
    return {**result, "published": written}


if __name__ == "__main__":
    from dcgh_dist.cli import run_job

    sys.exit(run_job(main))
