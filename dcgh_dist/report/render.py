"""The report as Markdown (figures as files beside it) and as one self-contained HTML page
(figures embedded as ``data:image/png;base64`` URIs, inline CSS, no script, no link out: it
opens offline, mailed as a single file)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Sequence

from dcgh_dist.report.runs import DatasetIdentity, Run
from dcgh_dist.report.table import Table

SECTIONS = (("curves", "Precision–recall and precision@N"), ("tsne", "Code maps (t-SNE)"),
            ("training", "Training curves"))


@dataclass
class FigureItem:
    name: str  # file stem under figures/
    kind: str  # a key of SECTIONS
    caption: str
    png: bytes


@dataclass
class Report:
    title: str
    dataset: DatasetIdentity
    runs: list[Run]
    table: Table
    figures: list[FigureItem] = field(default_factory=list)
    # per section: sentences the reader needs (caps, what is missing and why)
    notes: dict[str, list[str]] = field(default_factory=dict)


def _dataset_line(d: DatasetIdentity) -> str:
    return (f"{d.name} ({d.uri}): {d.num_classes} classes, {d.num_query:,} queries, {d.num_database:,} database "
            f"items (train + val + db); fingerprint {d.fingerprint} (dataset.json + split counts)")


TABLE_NOTE = ("Values are each run's metrics.json, over the whole database; bold marks the best value of each "
              "column. Runs with the same method and bits are one row: mean ± sample standard deviation over "
              "them; *seeds* gives their number and seeds.")


def _run_rows(runs: Sequence[Run]) -> list[list[str]]:
    out = []
    for r in runs:
        for bits, e in r.entries.items():
            secs = e.metrics.get("train_seconds", r.metrics.get("train_seconds"))
            out.append([r.name, r.method, str(bits), str(r.seed),
                        str(e.metrics.get("selected_epoch", r.selected_epoch) or "-"),
                        str(e.metrics.get("epochs_run", r.metrics.get("epochs_run", "-"))),
                        f"{secs:.0f} s" if isinstance(secs, (int, float)) else "-",
                        "yes" if e.checkpoint else "no"])
    return out


RUN_HEADER = ["run", "method", "bits", "seed", "selected epoch", "epochs run", "training time", "checkpoint"]


def table_cells(table: Table) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Header and rows of (text, is best) cells: what both renderings show."""
    header = ["method", "bits", "seeds"] + [c.label for c in table.columns]
    rows = []
    for i, row in enumerate(table.rows):
        cells = [(row.label, False), (str(row.bits), False), (row.seeds_text, False)]
        for c in table.columns:
            cell = row.cells.get(c.key)
            cells.append((cell.text(), i in table.best.get(c.key, [])) if cell else ("-", False))
        rows.append(cells)
    return header, rows


# --------------------------------------------------------------------------------------------
# Markdown


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
    return lines


def render_markdown(report: Report, figure_dir: str = "figures") -> str:
    header, rows = table_cells(report.table)
    lines = [f"# {report.title}", "", f"Dataset: {_dataset_line(report.dataset)}.", ""]
    lines += [f"- {n}" for n in report.notes.get("dataset", [])]
    lines += ["## Retrieval", ""]
    lines += _md_table(header, [[f"**{t}**" if best else t for t, best in r] for r in rows])
    lines += ["", TABLE_NOTE, ""]
    for kind, title in SECTIONS:
        items = [f for f in report.figures if f.kind == kind]
        notes = report.notes.get(kind, [])
        if not items and not notes:
            continue
        lines += [f"## {title}", ""]
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
        for f in items:
            lines += [f"### {f.caption}", "", f"![{f.caption}]({figure_dir}/{f.name}.png)", ""]
    lines += ["## Runs", ""] + _md_table(RUN_HEADER, _run_rows(report.runs)) + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
tr.baseline td { color: #555; font-style: italic; }
td strong { color: #000; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-weight: bold; margin-bottom: 0.4em; }
.note { color: #555; }
"""


def _h(s: str) -> str:
    return html.escape(str(s), quote=True)


def _html_table(header: list[str], rows: list[list[tuple[str, bool]]], classes: list[str] | None = None) -> list[str]:
    out = ["<table>", "<tr>" + "".join(f"<th>{_h(h)}</th>" for h in header) + "</tr>"]
    for i, r in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td><strong>{_h(t)}</strong></td>" if best else f"<td>{_h(t)}</td>"
                                         for t, best in r) + "</tr>")
    return out + ["</table>"]


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(report: Report) -> str:
    header, rows = table_cells(report.table)
    classes = ["" if r.kind == "method" else "baseline" for r in report.table.rows]
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{_h(report.title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
           f"<h1>{_h(report.title)}</h1>", f"<p>Dataset: {_h(_dataset_line(report.dataset))}.</p>"]
    out += [f'<p class="note">{_h(n)}</p>' for n in report.notes.get("dataset", [])]
    out += ["<h2>Retrieval</h2>"] + _html_table(header, rows, classes)
    out.append(f'<p class="note">{_h(TABLE_NOTE.replace("*", ""))}</p>')
    for kind, title in SECTIONS:
        items = [f for f in report.figures if f.kind == kind]
        notes = report.notes.get(kind, [])
        if not items and not notes:
            continue
        out.append(f"<h2>{_h(title)}</h2>")
        out += [f'<p class="note">{_h(n)}</p>' for n in notes]
        for f in items:
            out += [f'<figure id="{_h(f.name)}" data-kind="{_h(f.kind)}">', f"<figcaption>{_h(f.caption)}</figcaption>",
                    f'<img alt="{_h(f.caption)}" src="{data_uri(f.png)}">', "</figure>"]
    out += ["<h2>Runs</h2>"] + _html_table(RUN_HEADER, [[(c, False) for c in r] for r in _run_rows(report.runs)])
    out += ["</body>", "</html>", ""]
    return "\n".join(out)
