"""Raw benchmark dataset -> the dcgh-dist format (``dataset.json`` + Parquet shards), streamed.

Stages:

1. **Metadata** (one process): the layout module reads lists, tags and annotations, applies the
   dataset's protocol and returns the candidate items; everything dropped is counted.
2. **Order**: candidates are sorted by a seeded hash of their id (splits.py).
3. **Images** (a process pool): each image is read, decoded and optionally shrunk, in chunks.
   Results come back *in order* through a bounded window of chunks, so memory holds a few chunks
   of images, never the dataset, and the written order does not depend on worker timing.
4. **Write** (the main process): splits are handed out along the order to the items whose image
   is fine, rows go to the streaming shard writer, then the skip report and, last, dataset.json
   with the shard manifest. Before anything is written, the run's record goes into the output
   and what an earlier run left there is deleted; each shard is recorded, then moved from its
   temporary name to its final one (output.py: what the job may delete, and why).

Why a process pool and not Ray Data: preparation is a one-off job on one machine whose cost is
image decoding; a pool of spawned processes parallelises exactly that with no cluster to start,
and keeping the writer in one process is what makes shard boundaries deterministic. Inputs and
outputs on S3 go through pyarrow's filesystem in every process, as local paths do.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Iterator, Sequence

import pyarrow.fs as pafs

from dcgh_dist.config import PrepareConfig
from dcgh_dist.data.format import INFO_FILE, DatasetInfo
from dcgh_dist.storage import resolve_filesystem
from dcgh_dist.data.prepare import coco, listfile, mirflickr, nuswide
from dcgh_dist.data.prepare.base import Candidate, LayoutOptions, SourceScan
from dcgh_dist.data.prepare.images import ImageOptions, ImageResult, init_worker, process_chunk, warm_up
from dcgh_dist.data.prepare.output import TOOL, OutputContents, Run, inspect_output
from dcgh_dist.data.prepare.report import REPORT_FILE, SkipReport, report_json
from dcgh_dist.data.prepare.source import InputTree
from dcgh_dist.data.prepare.splits import SplitAssigner, SplitSizes, seeded_order
from dcgh_dist.data.prepare.writer import DataShard, ShardWriter, manifest_dict
from dcgh_dist.data.presets import DATASET_PRESETS

logger = logging.getLogger(__name__)

LAYOUT_NAMES = ("auto", "raw", "list")
# The raw layout of each preset (the list layout works for all of them).
RAW_LAYOUTS = {"mirflickr": mirflickr, "nuswide": nuswide, "coco": coco}
# Image (and metadata) failures tolerated before the job stops, whatever --max-image-errors says:
# a handful of bad files in a tiny dataset should be reported, not abort the run.
MIN_TOLERATED_IMAGE_ERRORS = 10


@dataclass(frozen=True, kw_only=True)
class PrepareOptions(PrepareConfig):
    """One run: what to prepare, from where, to where; the settings are the config tree's
    ``prepare`` section (:class:`dcgh_dist.config.PrepareConfig`), inherited."""

    dataset: str  # a preset name (mirflickr25k, nuswide, nuswide-top10, coco) or, with layout=list, any name
    input: str  # raw tree: directory or s3:// prefix
    output: str  # dataset: directory or s3:// prefix
    s3_endpoint: str | None = None
    overwrite: bool = False
    image_root: str | None = None
    class_names_file: str | None = None
    progress: bool = True


@dataclass
class PrepareResult:
    output: str
    info: DatasetInfo
    shards: list[DataShard]
    report: SkipReport
    report_path: str
    summary: dict[str, Any]  # what prepare_report.json holds, minus the reasons
    seconds: float = 0.0
    input_image_bytes: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def output_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


class PrepareError(ValueError):
    """The job stopped on bad input; the skip report has been written (see ``report_path``)."""

    def __init__(self, message: str, report_path: str, report: SkipReport | None = None):
        super().__init__(message)
        self.report_path = report_path
        self.report = report


# ---------------------------------------------------------------------------------------------
# Resolution of the options


def split_sizes(opts: PrepareOptions) -> SplitSizes:
    """The sizes asked for on the command line, else the preset's (custom datasets must say)."""
    preset = DATASET_PRESETS.get(opts.dataset)
    if preset is None and (opts.query is None or opts.train is None):
        raise ValueError(f"dataset {opts.dataset!r} is not a preset ({sorted(DATASET_PRESETS)}): give --query and --train")
    return SplitSizes(
        query=opts.query if opts.query is not None else preset.query,
        train=opts.train if opts.train is not None else preset.train,
        val=opts.val if opts.val is not None else (preset.val if preset else 0),
    )


def resolve_layout(dataset: str, tree: InputTree, layout: str = "auto") -> ModuleType:
    """The layout module to read ``tree`` with; errors say which file was expected."""
    if layout not in LAYOUT_NAMES:
        raise ValueError(f"--layout must be one of {LAYOUT_NAMES}, got {layout!r}")
    preset = DATASET_PRESETS.get(dataset)
    raw = RAW_LAYOUTS.get(preset.source) if preset else None
    if layout == "list":
        return listfile
    if layout == "raw":
        if raw is None:
            raise ValueError(f"dataset {dataset!r} has no raw layout (not a preset): use --layout list")
        return raw
    options = [m for m in (raw, listfile) if m is not None]
    for m in options:
        if m.detect(tree):
            return m
    raise FileNotFoundError(
        f"{tree.uri} does not match an input layout of {dataset}: expected "
        + " or ".join(m.expected(tree) for m in options)
        + " (pass --layout to force one and see what it misses)"
    )


def _layout_options(opts: PrepareOptions) -> LayoutOptions:
    preset = DATASET_PRESETS.get(opts.dataset)
    return LayoutOptions(
        dataset=opts.dataset,
        s3_endpoint=opts.s3_endpoint,
        image_root=opts.image_root,
        min_tag_images=opts.min_tag_images,
        top_k=opts.top_k or (preset.top_k if preset else None),
        nus_text=opts.nus_text,
        coco_captions=opts.coco_captions,
        class_names_file=opts.class_names_file,
        num_classes=(preset.num_classes if preset and not opts.top_k else None),
        image=ImageOptions(max_side=opts.max_side, jpeg_quality=opts.jpeg_quality),
    )


def check_output(fs: pafs.FileSystem, root: str, display: str, overwrite: bool) -> OutputContents:
    """What the output holds; refuses files this job cannot prove it wrote, and a complete dataset
    without ``overwrite`` (output.py has the rules)."""
    contents = inspect_output(fs, root, display)
    contents.check(overwrite)
    return contents


def warn_metadata_errors(report: SkipReport, layout: str) -> None:
    """One warning per reason of broken metadata, with its count and first example: the report
    has them all, but a file read wrongly (a column too many) should be seen on the console."""
    for reason, d in report.to_dict().items():
        if d["kind"] != "protocol":
            first = d["first"][0]
            logger.warning("%s: %d %s (%s): %s; first: id %s (%s): %s", layout, d["count"],
                           "skipped" if d["kind"] == "error" else "ignored", reason, d["description"],
                           first["id"], first["source"], first["detail"])


# ---------------------------------------------------------------------------------------------
# The image stage


def default_workers() -> int:
    """One worker per core but one: the main process reads the metadata and writes the shards
    (Parquet encoding, checksums), which would otherwise compete with the decoders."""
    return max(1, (os.cpu_count() or 1) - 1)


def start_pool(workers: int, s3_endpoint: str | None, image_opts: ImageOptions) -> ProcessPoolExecutor | None:
    """The image workers, started now so that their start-up overlaps the metadata stage."""
    if workers <= 0:
        return None
    # spawn, not fork: pyarrow's S3 client and its thread pools are not fork-safe.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=init_worker, initargs=(s3_endpoint, image_opts))
    for _ in range(workers):
        pool.submit(warm_up)
    return pool


def iter_images(
    ordered: Sequence[Candidate],
    image_root: str,
    pool: ProcessPoolExecutor | None,
    chunk_size: int,
    *,
    window: int = 4,
    s3_endpoint: str | None = None,
    image_opts: ImageOptions | None = None,
) -> Iterator[tuple[Candidate, ImageResult]]:
    """``(candidate, result)`` in the order of ``ordered``; in this process when ``pool`` is None
    (then ``s3_endpoint`` and ``image_opts`` are used here), else in the pool's workers with at
    most ``window`` chunks in flight."""
    chunks = [ordered[i:i + chunk_size] for i in range(0, len(ordered), chunk_size)]
    if pool is None:
        init_worker(s3_endpoint, image_opts or ImageOptions())
        for chunk in chunks:
            yield from zip(chunk, process_chunk(image_root, [c.image for c in chunk]))
        return
    pending: deque = deque()
    todo = iter(chunks)
    # A bounded window: workers stay busy while the writer drains results in order, and at most
    # ``window`` chunks of images are in memory.
    for chunk in todo:
        pending.append((chunk, pool.submit(process_chunk, image_root, [c.image for c in chunk])))
        if len(pending) >= window:
            break
    while pending:
        chunk, fut = pending.popleft()
        results = fut.result()
        nxt = next(todo, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(process_chunk, image_root, [c.image for c in nxt])))
        yield from zip(chunk, results)


# ---------------------------------------------------------------------------------------------
# The job


def prepare_dataset(opts: PrepareOptions) -> PrepareResult:
    """Run the whole preparation; see the module docstring and docs/PREPARE_DATA.md."""
    t0 = time.perf_counter()
    sizes = split_sizes(opts)
    if not 0.0 <= opts.max_image_errors <= 1.0:
        raise ValueError(f"--max-image-errors is a fraction in [0, 1], got {opts.max_image_errors}")
    tree = InputTree(opts.input, opts.s3_endpoint)
    if not tree.exists():
        raise FileNotFoundError(f"input {opts.input} does not exist")
    out_fs, out_root = resolve_filesystem(opts.output, opts.s3_endpoint)
    check_output(out_fs, out_root, opts.output, opts.overwrite)  # fail before the long part
    layout = resolve_layout(opts.dataset, tree, opts.layout)
    lopts = _layout_options(opts)
    workers = default_workers() if opts.workers is None else opts.workers

    pool = start_pool(workers, opts.s3_endpoint, lopts.image)
    try:
        return _run(opts, sizes, tree, layout, lopts, Run(out_fs, out_root, opts.output), pool, workers, t0)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _run(opts: PrepareOptions, sizes: SplitSizes, tree: InputTree, layout: ModuleType, lopts: LayoutOptions,
         run: Run, pool: ProcessPoolExecutor | None, workers: int, t0: float) -> PrepareResult:
    report = SkipReport()
    logger.info("reading the %s metadata of %s (%s layout)", opts.dataset, opts.input, layout.NAME)
    scan: SourceScan = layout.scan(tree, lopts, report)
    if not scan.class_names:
        raise ValueError(f"{opts.input}: no classes found (empty category / concept list?)")
    n_cand = len(scan.candidates)
    logger.info("%d of %d items pass the metadata checks; %d skipped so far", n_cand, scan.items_seen,
                report.total("protocol") + report.total("error"))
    warn_metadata_errors(report, scan.layout)
    info_base = DatasetInfo(name=opts.dataset, num_classes=len(scan.class_names),
                            class_names=tuple(scan.class_names), description=scan.description)
    report_display = f"{opts.output.rstrip('/')}/{REPORT_FILE}"
    list_unit = scan.layout == listfile.NAME  # the list layout accounts for lines, others for items
    unit = "line" if list_unit else "item"

    state: dict[str, Any] = {"images_processed": 0, "items_written": 0, "rows_written": 0}
    split_rows = {"query": 0, "val": 0, "train": 0, "db": 0}
    assigner = SplitAssigner(sizes)

    def write_report(status: str, error: str | None) -> dict[str, Any]:
        written_units = state["rows_written"] if list_unit else state["items_written"]
        dropped = report.total("protocol") + report.total("error")
        summary = {
            "status": status,
            "error": error,
            "dataset": opts.dataset,
            "layout": scan.layout,
            "input": opts.input,
            "output": opts.output,
            "unit": unit,
            "source_items": scan.items_seen,
            "candidates": n_cand,
            "images_processed": state["images_processed"],
            "items_written": state["items_written"],
            "rows_written": state["rows_written"],
            "split_items": dict(assigner.counts),
            "split_rows": dict(split_rows),
            "skipped": {k: report.total(k) for k in ("protocol", "error", "ignored")},
            # source_items = written + dropped when nothing was lost; reported, not assumed.
            "unaccounted": scan.items_seen - written_units - dropped if status == "ok" else None,
        }
        run.write_text(REPORT_FILE, report_json({**summary, "reasons": report.to_dict()}))
        return summary

    def fail(message: str) -> PrepareError:
        write_report("failed", message)
        return PrepareError(f"{message} (report: {report_display})", report_display, report)

    writer: ShardWriter | None = None
    progress = _Progress(n_cand, opts.progress)
    try:
        # Whatever an earlier run left (a dataset, with --overwrite; an interrupted run's files) goes now.
        run.start(opts.overwrite)
        # Broken metadata is tolerated in the same share as broken images: beyond it, the input
        # is more likely read wrongly (a label file of another width, the wrong list) than damaged.
        metadata_errors = report.total("error")
        if metadata_errors > max(MIN_TOLERATED_IMAGE_ERRORS, int(opts.max_image_errors * scan.items_seen)):
            reason, d = max(((r, d) for r, d in report.to_dict().items() if d["kind"] == "error"),
                            key=lambda rd: rd[1]["count"])
            first = d["first"][0]
            raise fail(
                f"{metadata_errors} of the {scan.items_seen} {unit}s of the input have broken metadata, more than "
                f"--max-image-errors {opts.max_image_errors:g} allows; most are {reason} ({d['count']}: "
                f"{d['description']}), first: id {first['id']} ({first['source']}): {first['detail']}"
            )
        if n_cand < max(1, sizes.required):
            raise fail(
                f"only {n_cand} items pass the checks, fewer than query + val + train = {sizes.required}: "
                "lower --query/--val/--train or fix the input"
            )

        ordered = seeded_order(scan.candidates, opts.seed)
        scan.candidates = []  # the ordered list holds them now
        writer = ShardWriter(run.fs, run.root, info_base, shard_bytes=opts.shard_bytes,
                             row_group_bytes=opts.row_group_bytes, display_root=opts.output.rstrip("/"),
                             run_id=run.id, before_publish=lambda e: run.record(e.path, e.bytes))
        allowed_errors = max(MIN_TOLERATED_IMAGE_ERRORS, int(opts.max_image_errors * n_cand))
        image_errors = 0
        input_bytes = 0
        logger.info("reading %d images with %d worker process(es) into %s", n_cand, workers, opts.output)
        for cand, res in iter_images(ordered, scan.image_root, pool, opts.chunk_size, window=2 * workers + 2,
                                     s3_endpoint=opts.s3_endpoint, image_opts=lopts.image):
            state["images_processed"] += 1
            input_bytes += res.read_bytes
            progress.update()
            if res.status != "ok":
                image_errors += 1
                for rid in ([r.id for r in cand.rows] if list_unit else [cand.id]):
                    report.add(res.status, rid, cand.source, res.detail)
                if image_errors > allowed_errors:
                    first = report.to_dict()[res.status]["first"][0]
                    raise fail(
                        f"{image_errors} of the first {state['images_processed']} images could not be used, "
                        f"more than --max-image-errors {opts.max_image_errors:g} of {n_cand} allows; is the "
                        f"image root {scan.image_root} right? first: id {first['id']} ({first['source']}): {first['detail']}"
                    )
                continue
            split = assigner.next()
            for row in cand.rows:
                writer.add(row.id, list(row.labels), split, res.data, row.text)
                split_rows[split] += 1
            state["items_written"] += 1
            state["rows_written"] += len(cand.rows)
        shards = writer.close()
        progress.close()

        short = assigner.shortfall()
        if short or not state["items_written"]:
            raise fail(
                f"after skipping unusable images, {assigner.assigned} items remain: not enough for the split "
                f"sizes (missing {short}); lower --query/--val/--train or fix the input"
            )
        summary = write_report("ok", None)
        if summary["unaccounted"]:
            logger.warning("%d items are neither written nor in the skip report: please report this",
                           summary["unaccounted"])

        info = DatasetInfo(
            name=info_base.name,
            num_classes=info_base.num_classes,
            class_names=info_base.class_names,
            description=info_base.description,
            extra={
                "manifest": manifest_dict(shards),
                "prepare": {
                    "tool": TOOL,
                    "dataset": opts.dataset,
                    "layout": summary["layout"],
                    "input": opts.input,
                    "seed": opts.seed,
                    "order": "ascending blake2b-64 of 'seed:id'",
                    "split_sizes": sizes.as_dict(),
                    "split_items": summary["split_items"],
                    "split_rows": summary["split_rows"],
                    "max_side": opts.max_side,
                    "jpeg_quality": opts.jpeg_quality if opts.max_side else None,
                    "shard_bytes": opts.shard_bytes,
                    "source": scan.details,
                    "skipped": report.reasons,
                    "report": REPORT_FILE,
                },
            },
        )
        run.write_text(INFO_FILE, info.to_json())  # last: marks completion
        run.finish()
    except BaseException:
        # An error or a signal (SIGINT, or SIGTERM through jobs/prepare_data.py): delete what this
        # run wrote, keeping the report of a failure.
        if writer is not None:
            writer.abort()
        progress.close()
        run.abort()
        raise
    seconds = time.perf_counter() - t0
    return PrepareResult(output=opts.output, info=info, shards=shards, report=report,
                         report_path=report_display, summary=summary, seconds=seconds,
                         input_image_bytes=input_bytes, details=scan.details)


class _Progress:
    """tqdm on a terminal; a log line every 10% elsewhere (ray job logs, CI)."""

    def __init__(self, total: int, enabled: bool):
        import sys

        self.total, self.done, self.next_log = total, 0, 0.1
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc="images", smoothing=0.05)
        self.enabled = enabled

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and self.total and self.done / self.total >= self.next_log:
            logger.info("images: %d / %d (%.0f%%)", self.done, self.total, 100 * self.done / self.total)
            self.next_log += 0.1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
