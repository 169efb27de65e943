"""The report's table: rows method x bits (and the baselines), columns from metrics.json.

Every number is metrics.json's own: a row of one run shows its values as they are; runs of one
experiment (the same config but for the seed, ``runs.label_experiments``) and bits are one row, mean and sample standard deviation
(``statistics.stdev``, n - 1) over the runs. The untrained model and the linear baseline are
rows too, one per bit length (the untrained one per method as well: each method has its own
architecture); their values do not depend on the run beyond its seed, so each seed counts once.
A run whose metrics.json names a ``"variant"`` (jobs/ablate.py) is a row of its own, labelled by
the variant; it shares its method's baseline rows.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

from dcgh_dist.report.runs import Run

LINEAR_LABEL = "linear (ridge + rotation)"
UNTRAINED_LABEL = "untrained"
DIRECTIONS = {"i2t": "i→t", "t2i": "t→i"}
_COLUMN = re.compile(r"^(map(?:@(\d+))?|ndcg@(\d+)|p@(\d+))_(i2t|t2i)$")


@dataclass(frozen=True)
class Column:
    key: str  # the metrics.json key, e.g. "ndcg@1000_i2t"
    label: str  # e.g. "NDCG@1000 i→t"
    sort: tuple


@dataclass
class Cell:
    mean: float
    std: float | None  # None for a single value
    n: int
    values: list[float]

    def text(self, digits: int = 4) -> str:
        s = f"{self.mean:.{digits}f}"
        return s if self.std is None else f"{s} ± {self.std:.{digits}f}"


@dataclass
class Row:
    kind: str  # "method", "untrained" or "linear"
    label: str  # what the method column shows
    method: str | None  # the method of a trained or untrained row
    bits: int
    seeds: list[int]
    runs: list[str]
    cells: dict[str, Cell] = field(default_factory=dict)

    @property
    def seeds_text(self) -> str:
        return f"{len(self.seeds)} ({', '.join(str(s) for s in self.seeds)})"


@dataclass
class Table:
    columns: list[Column]
    rows: list[Row]
    best: dict[str, list[int]]  # column key -> indices of the rows holding its best (highest) mean

    def to_dict(self) -> dict[str, Any]:
        return {
            "columns": [{"key": c.key, "label": c.label} for c in self.columns],
            "rows": [{"kind": r.kind, "label": r.label, "method": r.method, "bits": r.bits, "seeds": r.seeds,
                      "runs": r.runs,
                      "cells": {k: {"mean": c.mean, "std": c.std, "n": c.n, "values": c.values}
                                for k, c in r.cells.items()}} for r in self.rows],
            "best": self.best,
        }


def column_for(key: str) -> Column | None:
    m = _COLUMN.match(key)
    if not m:
        return None
    name, map_k, ndcg_k, p_k, direction = m.groups()
    arrow = DIRECTIONS[direction]
    d = 0 if direction == "i2t" else 1
    if name.startswith("map"):
        return Column(key, f"mAP{'@' + map_k if map_k else ''} {arrow}", (0, int(map_k or 0), d))
    if ndcg_k:
        return Column(key, f"NDCG@{ndcg_k} {arrow}", (1, int(ndcg_k), d))
    return Column(key, f"P@{p_k} {arrow}", (2, int(p_k), d))


def _cell(values: list[float]) -> Cell:
    n = len(values)
    # a single run's value is shown as metrics.json has it (fsum of one value is that value)
    mean = math.fsum(values) / n
    return Cell(mean, statistics.stdev(values) if n > 1 else None, n, list(values))


def build_table(runs: Sequence[Run]) -> Table:
    methods = sorted({r.method for r in runs})
    untrained_label = (lambda m: UNTRAINED_LABEL) if len(methods) == 1 else (lambda m: f"{UNTRAINED_LABEL} ({m})")
    # (kind, method, bits, label) -> [(seed, run name, metrics)]; a trained row's label is the
    # run's variant or method (Run.label), so variants of one method are rows of their own while
    # sharing the method's baselines (their models start the same)
    groups: dict[tuple, list[tuple[int, str, dict]]] = {}
    for run in runs:
        for bits, entry in run.entries.items():
            groups.setdefault(("method", run.method, bits, run.label), []).append((run.seed, run.name, entry.metrics))
            for kind, base, method, label in (("untrained", entry.untrained, run.method, untrained_label(run.method)),
                                              ("linear", entry.linear, None, LINEAR_LABEL)):
                if base:
                    samples = groups.setdefault((kind, method, bits, label), [])
                    if run.seed not in [s for s, _, _ in samples]:  # the same seed gives the same baseline
                        samples.append((run.seed, run.name, base))
    kind_order = {"method": 0, "untrained": 1, "linear": 2}
    keys = sorted(groups, key=lambda k: (k[2], kind_order[k[0]], k[1] or "", k[3]))
    columns = {}
    rows = []
    for kind, method, bits, label in keys:
        samples = sorted(groups[(kind, method, bits, label)], key=lambda s: s[0])
        row = Row(kind, label, method, bits, [s for s, _, _ in samples], [n for _, n, _ in samples])
        keys_here = sorted({k for _, _, m in samples for k in m if column_for(k)})
        for key in keys_here:
            values = [float(m[key]) for _, _, m in samples if isinstance(m.get(key), (int, float))]
            if values:
                row.cells[key] = _cell(values)
                columns.setdefault(key, column_for(key))
        rows.append(row)
    cols = sorted(columns.values(), key=lambda c: c.sort)
    best = {}
    for c in cols:
        means = [(i, r.cells[c.key].mean) for i, r in enumerate(rows)
                 if c.key in r.cells and math.isfinite(r.cells[c.key].mean)]
        if means:
            top = max(v for _, v in means)
            best[c.key] = [i for i, v in means if v == top]
    return Table(cols, rows, best)
