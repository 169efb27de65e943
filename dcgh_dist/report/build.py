"""From finished runs to report.md, report.html, report.json and figures/ (see docs/REPORT.md)."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict
from typing import Callable, Sequence

import numpy as np

from dcgh_dist.metrics import precision_at_n
from dcgh_dist.report.codes import Rows, choose_rows, drop_unusable, encode_rows, linear_codes
from dcgh_dist.report.curves import n_grid, sample_ids
from dcgh_dist.report.figures import curves_figure, series_styles, training_figure, tsne_embedding, tsne_figure
from dcgh_dist.report.render import FigureItem, Report, render_html, render_markdown
from dcgh_dist.report.runs import Run, check_comparable, load_runs
from dcgh_dist.report.table import Table, build_table

logger = logging.getLogger(__name__)

DEFAULT_MAX_ITEMS = 20_000
DEFAULT_TSNE_POINTS = 2_000
# Models held in memory at once while encoding (a ViT-B/32 hasher is ~600 MB in fp32); each
# group reads the dataset once, preprocessing shared by the group's models.
MODELS_PER_PASS = 4
TASKS = {"i2t": ("image", "text"), "t2i": ("text", "image")}


def build_report(
    run_paths: Sequence[str],
    output: str,
    *,
    max_items: int = DEFAULT_MAX_ITEMS,
    tsne_points: int = DEFAULT_TSNE_POINTS,
    batch_size: int = 256,
    s3_endpoint: str | None = None,
    device: str = "cpu",
    title: str | None = None,
) -> Report:
    """Check the runs (all before any model is loaded), then encode, draw and write.

    Raises:
        RunError (a ValueError): a directory that is not a finished run, or runs scored on
            different datasets or splits; the message names the runs and what differs.
    """
    if max_items < 1:
        raise ValueError(f"--max-items must be >= 1, got {max_items}")
    if tsne_points < 0:
        raise ValueError(f"--tsne-points must be >= 0 (0: no code maps), got {tsne_points}")
    runs = load_runs(run_paths, s3_endpoint)
    identity, same_content = check_comparable(runs, s3_endpoint)
    table = build_table(runs)
    report = Report(title or f"Retrieval report: {identity.name}", identity, runs, table,
                    notes={"dataset": same_content})
    _add_figures(report, max_items=max_items, tsne_points=tsne_points, batch_size=batch_size,
                 s3_endpoint=s3_endpoint, device=device)
    write_report(report, output)
    return report


# --------------------------------------------------------------------------------------------


def _series_plan(runs: Sequence[Run], table: Table) -> dict[int, list[dict]]:
    """Per bit length, the lines of its figure, in the table's row order: label, kind, and the
    code sets to average (one per seed) as ``("trained", run, bits)``, ``("untrained", run,
    bits)`` or ``("linear", bits, seed, ridge_rel)``."""
    plan: dict[int, list[dict]] = {}
    for row in table.rows:
        members = []
        for run in runs:
            e = run.entries.get(row.bits)
            if e is None or run.name not in row.runs:
                continue
            if row.kind == "method" and run.method == row.method and e.checkpoint:
                members.append(("trained", run, row.bits))
            elif row.kind == "untrained" and run.method == row.method and e.checkpoint:
                members.append(("untrained", run, row.bits))
            elif row.kind == "linear" and "ridge_rel" in (e.linear or {}):
                members.append(("linear", row.bits, run.seed, float(e.linear["ridge_rel"])))
        plan.setdefault(row.bits, []).append({"label": row.label, "kind": row.kind, "members": members,
                                              "runs": row.runs})
    return plan


def _encoder_factories(plan: dict[int, list[dict]], device: str, s3_endpoint: str | None) -> dict[str, Callable]:
    from dcgh_dist.models.encoder import Encoder

    factories: dict[str, Callable] = {}
    for lines in plan.values():
        for line in lines:
            for m in line["members"]:
                if m[0] == "linear":
                    continue
                kind, run, bits = m
                ckpt = run.entries[bits].checkpoint
                key = f"{kind}:{run.uri}:{bits}"
                if kind == "trained":
                    factories[key] = lambda c=ckpt, b=bits: Encoder.from_checkpoint(
                        c, s3_endpoint=s3_endpoint, device=device, bits=b)  # a multi-length checkpoint: this head
                else:  # the model training started from: same config, same seed

                    def untrained(c=ckpt, b=bits):
                        from dcgh_dist.models.checkpoint import read_meta

                        meta = read_meta(c, s3_endpoint)
                        return Encoder.untrained(meta.config, meta.dataset_info, device=device, bits=b)

                    factories[key] = untrained
    return factories


def _member_key(m: tuple) -> str:
    return f"linear:{m[1]}:{m[2]}:{m[3]}" if m[0] == "linear" else f"{m[0]}:{m[1].uri}:{m[2]}"


def _curves(codes: dict, rows: Rows, ns: np.ndarray) -> dict:
    from dcgh_dist.metrics import pr_curve_hamming

    ql, dl = rows.labels["query"], rows.labels["db"]
    pr, pn = {}, {}
    for task, (qm, dm) in TASKS.items():
        q, d = codes["query"][qm], codes["db"][dm]
        pr[task] = pr_curve_hamming(q, d, ql, dl)
        pn[task] = precision_at_n(q, d, ql, dl, ns)
    return {"pr": pr, "pn": pn, "ns": ns}


def _mean_curves(parts: list[dict]) -> dict:
    if len(parts) == 1:
        return parts[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # radii where no seed retrieves anything stay NaN
        pr = {t: {k: np.nanmean([p["pr"][t][k] for p in parts], axis=0) for k in ("precision", "recall")}
              for t in TASKS}
    pn = {t: np.mean([p["pn"][t] for p in parts], axis=0) for t in TASKS}
    return {"pr": pr, "pn": pn, "ns": parts[0]["ns"]}


def _add_figures(report: Report, *, max_items: int, tsne_points: int, batch_size: int, s3_endpoint: str | None,
                 device: str) -> None:
    from dcgh_dist.data.format import read_dataset_info

    runs, table = report.runs, report.table
    uri = runs[0].dataset_uri
    info = read_dataset_info(uri, s3_endpoint)
    rows = choose_rows(uri, s3_endpoint, max_items)
    plan = _series_plan(runs, table)
    notes = report.notes.setdefault("curves", [])
    n_db = len(rows.ids["db"])
    cap = (f"The database is capped at {n_db:,} of its {rows.db_total:,} items (--max-items {max_items}; a "
           "deterministic sample by a hash of the id, the same for every model), so these curves differ from "
           "the table's whole-database numbers." if rows.capped
           else f"Database: all {n_db:,} items (under --max-items {max_items}).")
    notes += [f"Recomputed in this process from each run's checkpoint: {len(rows.ids['query']):,} queries "
              f"(the whole query split) against the database. {cap}",
              "Rows of the table with several seeds are drawn as the mean of their curves."]
    for run in runs:
        for bits, e in run.entries.items():
            if e.checkpoint is None:
                notes.append(f"Run {run.name} has no checkpoint for {bits} bits: its lines are missing.")

    factories = _encoder_factories(plan, device, s3_endpoint)
    codes: dict[str, dict] = {}
    ok_all = {p: np.ones(len(rows.ids[p]), dtype=bool) for p in rows.ids}
    names = list(factories)
    for start in range(0, len(names), MODELS_PER_PASS):
        group = names[start:start + MODELS_PER_PASS]
        logger.info("encoding %d queries and %d database items with %d model(s)", len(rows.ids["query"]), n_db,
                    len(group))
        encoders = {n: factories[n]() for n in group}
        got, ok = encode_rows(uri, info, s3_endpoint, rows, encoders, batch_size)
        codes.update(got)
        for p in ok_all:
            ok_all[p] &= ok[p]
        del encoders
    drop_unusable(rows, ok_all, list(codes.values()))
    if any(rows.dropped.values()):
        notes.append(f"Left out: {rows.dropped.get('query', 0)} query and {rows.dropped.get('db', 0)} database rows "
                     "whose image or caption could not be used.")
    for lines in plan.values():
        for line in lines:
            for m in line["members"]:
                if m[0] == "linear" and _member_key(m) not in codes:
                    codes[_member_key(m)] = linear_codes(uri, info, s3_endpoint, rows, m[1], m[2], m[3])

    ks = sorted({int(c.key.split("@")[1].split("_")[0]) for c in table.columns if c.key.startswith("p@")})
    ns = n_grid(len(rows.ids["db"]), ks)
    for bits in sorted(plan):
        lines = [line for line in plan[bits] if line["members"]]
        if not lines:
            continue
        series = {line["label"]: _mean_curves([_curves(codes[_member_key(m)], rows, ns) for m in line["members"]])
                  for line in lines}
        styles = series_styles(list(series), {line["label"]: line["kind"] for line in lines})
        png = curves_figure(series, styles, f"{bits} bits on {info.name}: Hamming-radius PR and precision@N")
        report.figures.append(FigureItem(f"curves-{bits}bits", "curves", f"{bits} bits", png))

    if tsne_points >= 4:
        _add_tsne(report, plan, codes, rows, info, tsne_points)
    _add_training(report)


def _add_tsne(report: Report, plan: dict, codes: dict, rows: Rows, info, tsne_points: int) -> None:
    n = min(len(rows.ids["query"]), tsne_points // 2)
    pick = np.searchsorted(rows.ids["query"], sample_ids(rows.ids["query"], n))
    report.notes.setdefault("tsne", []).append(
        f"One t-SNE (scikit-learn) of the image and the text codes of {n:,} query items together (a deterministic "
        f"sample by id; --tsne-points {tsne_points} caps image + text points), coloured by each item's first label; "
        "one map per method and bit length, from its run with the lowest seed.")
    for bits in sorted(plan):
        for line in plan[bits]:
            trained = [m for m in line["members"] if m[0] == "trained"]
            if line["kind"] != "method" or not trained:
                continue
            run = min((m[1] for m in trained), key=lambda r: (r.seed, r.name))
            c = codes[_member_key(("trained", run, bits))]["query"]
            emb = tsne_embedding(c["image"][pick], c["text"][pick], seed=0)
            png = tsne_figure(emb, rows.first_label["query"][pick], info.class_names,
                              f"{line['label']}, {bits} bits: query codes (run {run.name}, seed {run.seed})")
            report.figures.append(FigureItem(f"tsne-{_slug(line['label'])}-{bits}bits", "tsne",
                                             f"{line['label']}, {bits} bits", png))


def _add_training(report: Report) -> None:
    for i, run in enumerate(report.runs):
        # a run of several lengths may keep a history per length; else the run's own
        per_entry = [(bits, e.history) for bits, e in run.entries.items() if e.history] if "by_bits" in run.metrics else []
        histories = per_entry or [(None, list(run.metrics.get("history") or []))]
        for bits, hist in histories:
            if not hist:
                report.notes.setdefault("training", []).append(f"Run {run.name} has no per-epoch history.")
                continue
            label = f"{run.name}: {run.method}, {bits or ', '.join(map(str, run.entries))} bits, seed {run.seed}"
            selected = (run.entries[bits].metrics.get("selected_epoch") if bits else None) or run.selected_epoch
            png = training_figure(hist, selected, label)
            report.figures.append(FigureItem(f"training-{i + 1}{'-' + str(bits) + 'bits' if bits else ''}",
                                             "training", label, png))


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in s).strip("-").lower() or "method"


# --------------------------------------------------------------------------------------------


def write_report(report: Report, output: str) -> dict[str, str]:
    """report.md, report.html, report.json and figures/*.png under ``output`` (each written
    atomically); returns their paths."""
    from dcgh_dist.storage import join, resolve_filesystem, write_bytes_atomic, write_text_atomic

    fs, root = resolve_filesystem(output)
    fs.create_dir(join(root, "figures"), recursive=True)
    for f in report.figures:
        write_bytes_atomic(fs, join(root, "figures", f"{f.name}.png"), f.png)
    summary = {
        "title": report.title,
        "dataset": asdict(report.dataset),
        "table": report.table.to_dict(),
        "runs": [{"path": r.name, "method": r.method, "seed": r.seed, "bits": list(r.entries),
                  "dataset": r.dataset_uri} for r in report.runs],
        "notes": report.notes,
        "figures": [{"name": f.name, "kind": f.kind, "caption": f.caption, "file": f"figures/{f.name}.png"}
                    for f in report.figures],
    }
    paths = {"md": join(root, "report.md"), "html": join(root, "report.html"), "json": join(root, "report.json")}
    write_text_atomic(fs, paths["json"], json.dumps(summary, indent=2, ensure_ascii=False))
    write_text_atomic(fs, paths["md"], render_markdown(report))
    write_text_atomic(fs, paths["html"], render_html(report))
    return paths

