"""A report over finished training runs: report.md and a self-contained report.html.

    python jobs/report.py --runs runs/dcgh-16 runs/dcgh-32 --output reports/demo
    python jobs/report.py --runs runs/seed0 runs/seed1 runs/daph --output reports/cmp --max-items 50000

The table (rows method x bits, the untrained and linear baselines, mean ± std over seeds) is read
from each run's metrics.json; the precision-recall / precision@N curves and the t-SNE maps of the
codes re-encode the query split and a database capped at --max-items with each run's checkpoint,
in this process (no Ray); the training curves come from each run's history. Runs evaluated on
different datasets or splits are refused, as is a directory that is not a finished run, with one
"error: ..." line and exit code 2. Writes OUTPUT/report.md (+ figures/*.png), OUTPUT/report.html
(images embedded, opens offline) and OUTPUT/report.json (the table's exact values). See docs/REPORT.md.
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

logger = logging.getLogger(__name__)


# The flags are shorthands for keys of the config tree.
FLAGS = {"batch_size": "eval.batch_size"}
# What this job reads of the tree: an override of anything else would be ignored, so it is refused.
READS = ("eval.batch_size", "data.s3_endpoint")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from dcgh_dist.cli import add_config_arguments
    from dcgh_dist.report import DEFAULT_MAX_ITEMS, DEFAULT_TSNE_POINTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="DIR",
                   help="finished run directories (the --output-dir of jobs/train.py), local or s3://")
    p.add_argument("--output", required=True, metavar="REPORT_DIR", help="where the report goes")
    p.add_argument("--max-items", type=int, default=DEFAULT_MAX_ITEMS,
                   help=f"database rows re-encoded for the curves (default {DEFAULT_MAX_ITEMS}; a sample by id)")
    p.add_argument("--tsne-points", type=int, default=DEFAULT_TSNE_POINTS,
                   help=f"image + text points per code map (default {DEFAULT_TSNE_POINTS}; 0: no maps)")
    p.add_argument("--batch-size", type=int, help="rows per model call while encoding (eval.batch_size)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--title", help="the report's title (default: the dataset's name)")
    add_config_arguments(p, ray=False)
    return p.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    args = parse_args(argv)
    from dcgh_dist.cli import setup_job_process

    setup_job_process()  # before the library imports Ray

    from dcgh_dist.cli import config_from_args
    from dcgh_dist.report import build_report

    cfg = config_from_args(args, FLAGS, reads=READS)
    output = args.output.rstrip("/") or "/"
    report = build_report(args.runs, output, max_items=args.max_items, tsne_points=args.tsne_points,
                          batch_size=cfg.eval.batch_size, s3_endpoint=cfg.data.s3_endpoint, device=args.device,
                          title=args.title)
    paths = {k: f"{output}/report.{k}" for k in ("md", "html", "json")}
    print(f"report of {len(report.runs)} run(s), {len(report.table.rows)} table rows, {len(report.figures)} "
          f"figures: {paths['md']}, {paths['html']}", flush=True)
    return paths

