"""Prepare a benchmark dataset (MIRFLICKR-25K, NUS-WIDE, MS-COCO) in the dcgh-dist format.

    python jobs/prepare_data.py --dataset mirflickr25k --input /raw/mirflickr25k
    python jobs/prepare_data.py --dataset coco --input s3://raw/coco2017 --output s3://data/coco --max-side 512
    python jobs/prepare_data.py --dataset nuswide-top10 --input /raw/NUS-WIDE --query 2100 --train 10500 --seed 1
    python jobs/prepare_data.py --dataset coco --input /raw/coco_lists --layout list --image-root /raw/coco2014

The input layout is detected from the files under --input (raw distribution, or the
all_imgs.txt / all_tags.txt / all_labels.txt list layout); --layout forces one. The output
defaults to the preset's place under the data root ($DCGH_DATA_ROOT, else ~/.cache/dcgh_dist),
which is where `jobs/train.py --dataset NAME` looks. Writes Parquet shards, prepare_report.json
(everything skipped, by reason) and, last, dataset.json with the shard manifest. SIGTERM is
handled like Ctrl-C: the run deletes what it wrote and exits with status 143; a run killed outright
leaves a record, and the next run deletes what it names. See docs/PREPARE_DATA.md.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import threading
from typing import Sequence

logger = logging.getLogger(__name__)

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"256MB"`` -> bytes. Units are powers of 1024 (256MB = 256 x 2^20); no unit = bytes."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB, 1GB, 1048576)")
    value = float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " ")
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return int(value)


# The flags are shorthands for keys of the config tree (section ``prepare``).
FLAGS = {name: f"prepare.{name}" for name in (
    "layout", "seed", "query", "val", "train", "max_side", "jpeg_quality", "workers", "chunk_size",
    "max_image_errors", "coco_captions", "nus_text", "top_k", "min_tag_images")}
FLAGS["shard_size"] = "prepare.shard_bytes"
# What this job reads of the tree: an override of anything else would be ignored, so it is refused.
READS = ("prepare", "data.s3_endpoint")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from dcgh_dist.cli import add_config_arguments
    from dcgh_dist.data.presets import DATASET_PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True,
                   help=f"a preset ({', '.join(DATASET_PRESETS)}), or any name with --layout list")
    p.add_argument("--input", required=True, help="the raw tree: a directory or s3:// prefix")
    p.add_argument("--output", help="directory or s3:// prefix (default: the preset's path under the data root)")
    p.add_argument("--data-root", help="data root for the default --output (default: $DCGH_DATA_ROOT, else ~/.cache/dcgh_dist)")
    p.add_argument("--layout", choices=("auto", "raw", "list"),
                   help="input layout (default: detected from the files)")
    p.add_argument("--image-root", help="where image paths are relative to (list layout, NUS-WIDE); default: detected")
    p.add_argument("--seed", type=int, help="split seed (default 0)")
    p.add_argument("--query", type=int, help="query split size (default: the paper's)")
    p.add_argument("--val", type=int, help="val split size, carved from the non-query rows (default: half the query size)")
    p.add_argument("--train", type=int, help="training split size (default: the paper's)")
    p.add_argument("--shard-size", type=parse_size, help="target shard size (default 256MB)")
    p.add_argument("--max-side", type=int, help="shrink larger images to fit this many pixels and re-encode as JPEG (default: keep the original bytes)")
    p.add_argument("--jpeg-quality", type=int, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--workers", type=int, help="image worker processes (default: cores - 1, at least 1; 0 = in this process)")
    p.add_argument("--chunk-size", type=int, help="images per worker task (default 32)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset this job prepared at --output (only the files its dataset.json "
                        "lists; any other file is refused)")
    p.add_argument("--max-image-errors", type=float,
                   help="stop when more than this fraction of the images is missing or undecodable, or of the "
                        "items has broken metadata (a malformed label row, ...) (default 0.05)")
    p.add_argument("--coco-captions", choices=("first", "join", "all"),
                   help="COCO text: the first caption, all joined, or one row per caption (default first)")
    p.add_argument("--nus-text", choices=("auto", "alltags", "tags1k"),
                   help="NUS-WIDE text: All_Tags.txt, or the 1k-tag vocabulary (default: All_Tags.txt if present)")
    p.add_argument("--top-k", type=int, help="NUS-WIDE: keep the k most frequent concepts (default: 21, or 10 for nuswide-top10)")
    p.add_argument("--min-tag-images", type=int,
                   help="MIRFLICKR: the tag vocabulary is the tags of at least this many images (default 20)")
    p.add_argument("--class-names", help="list layout: a file of class names, one a line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_arguments(p, ray=False)
    return p.parse_intermixed_args(argv)


def build_options(args: argparse.Namespace):
    from dataclasses import asdict

    from dcgh_dist.cli import config_from_args
    from dcgh_dist.data.prepare import PrepareOptions
    from dcgh_dist.data.presets import DATASET_PRESETS, preset_output_path

    output = args.output
    if output is None:
        if args.dataset not in DATASET_PRESETS:
            raise ValueError(f"--output is required for a dataset that is not a preset ({args.dataset!r})")
        output = preset_output_path(args.dataset, args.data_root)
    tree = config_from_args(args, FLAGS, reads=READS)
    return PrepareOptions(
        dataset=args.dataset, input=args.input, output=output, s3_endpoint=tree.data.s3_endpoint,
        overwrite=args.overwrite, image_root=args.image_root, class_names_file=args.class_names,
        progress=not args.no_progress, **asdict(tree.prepare),
    )


def _stop_on_sigterm(signum: int, frame) -> None:
    """SIGTERM (``ray job stop``, Kubernetes, ``kill``) as an exception, so that the clean-up that
    runs for Ctrl-C runs for it too. Once: a second SIGTERM stops the process at once (the run's
    record then lets the next run delete what is left)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logger.warning("SIGTERM: stopping; deleting what this run wrote")
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> dict:
    """Prepare the dataset; returns the summary (also in <output>/prepare_report.json)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dcgh_dist.data.prepare import PrepareError, prepare_dataset

    opts = build_options(args)
    # Signal handlers can only be set from the main thread (main() may be called from others).
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if in_main_thread else None
    try:
        result = prepare_dataset(opts)
    except PrepareError as e:
        if e.report is not None:
            print(e.report.summary(), flush=True)
        raise
    finally:
        if in_main_thread:  # (None: a handler not set from Python, which cannot be put back)
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    s = result.summary
    mb = result.output_bytes / 1e6
    print(
        f"prepared {opts.dataset} at {opts.output}: {result.rows} rows ({s['items_written']} items) in "
        f"{len(result.shards)} shard(s), {mb:.1f} MB, {result.seconds:.1f} s "
        f"({result.rows / max(result.seconds, 1e-9):.0f} rows/s, {mb / max(result.seconds, 1e-9):.1f} MB/s written)",
        flush=True,
    )
    print("split rows: " + ", ".join(f"{k} {v}" for k, v in s["split_rows"].items()), flush=True)
    print(result.report.summary(), flush=True)
    print(f"report: {result.report_path}", flush=True)
    return {
        **s,
        "shards": len(result.shards),
        "bytes": result.output_bytes,
        "input_image_bytes": result.input_image_bytes,
        "seconds": result.seconds,
        "report_path": result.report_path,
    }

