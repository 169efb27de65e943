"""Named ablations of the DCGH loss, and their table (see jobs/ablate.py and docs/REPORT.md).

A variant is a name and the ``section.key=value`` overrides it applies on top of the user's
config; ``full`` applies none and is the reference every other variant is read against. The
table is the report's own (:func:`dcgh_dist.report.table.build_table`, each run's metrics.json):
per variant the mean ± sample standard deviation over seeds of mAP image→text and text→image,
and the difference of the means from ``full``.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from dcgh_dist.report.table import Cell, Table

REFERENCE = "full"
# name -> overrides (LossConfig keys, dcgh_dist/config.py); the order is the default run order.
VARIANTS: dict[str, tuple[str, ...]] = {
    "full": (),
    "proxy-only": ("loss.pairwise_pos_weight=0", "loss.pairwise_neg_weight=0", "loss.variance_weight=0"),
    "pairwise-only": ("loss.proxy_weight=0", "loss.variance_weight=0"),
    "no-variance": ("loss.variance_weight=0",),
    # all workers' codes in the pair terms vs each worker's own batch: the same with one worker
    "gather-local": ("loss.gather=local",),
    "variance-masked": ("loss.variance_mode=masked",),
}
METRICS = (("map_i2t", "mAP i→t"), ("map_t2i", "mAP t→i"))


def check_variants(names: Sequence[str]) -> list[str]:
    """The names, in order, or a ValueError naming the unknown (or repeated) ones and the valid ones."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; valid variants: {', '.join(VARIANTS)}")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ValueError(f"variant(s) given twice: {', '.join(repeated)}")
    if not names:
        raise ValueError(f"no variants given; valid variants: {', '.join(VARIANTS)}")
    return list(names)


def variant_overrides(name: str) -> tuple[str, ...]:
    """The overrides ``name`` applies (a ValueError for an unknown name, listing the valid ones)."""
    check_variants([name])
    return VARIANTS[name]


def run_name(variant: str, seed: int) -> str:
    """The run's directory under ``<output>/runs``."""
    return f"{variant}-s{seed}"


def variant_cells(table: Table, variants: Sequence[str], bits: int) -> dict[str, dict[str, Cell]]:
    """variant -> {metric key -> Cell} from the report's table (the trained rows of ``bits``)."""
    out: dict[str, dict[str, Cell]] = {}
    for row in table.rows:
        if row.kind == "method" and row.bits == bits and row.label in variants:
            if row.label in out:
                raise ValueError(f"two table rows are labelled {row.label!r} at {bits} bits")
            out[row.label] = dict(row.cells)
    missing = [v for v in variants if v not in out]
    if missing:
        raise ValueError(f"the report has no row for variant(s) {', '.join(missing)} at {bits} bits")
    return out


def _signed(x: float, digits: int) -> str:
    return f"{x:+.{digits}f}" if math.isfinite(x) else "-"


def ablation_markdown(table: Table, variants: Sequence[str], bits: int, seeds_of: Mapping[str, Sequence[int]],
                      *, digits: int = 4) -> str:
    """The compact table: variant, its overrides, seeds, and per direction the mean ± std over
    seeds and the difference of the means from ``full`` (blank without a ``full`` run)."""
    cells = variant_cells(table, variants, bits)
    ref = cells.get(REFERENCE)
    header = ["variant", "overrides", "seeds"]
    for _, label in METRICS:
        header += [label, f"Δ {label.split(' ', 1)[1]} vs {REFERENCE}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in variants:
        row = [v, ", ".join(f"`{o}`" for o in VARIANTS[v]) or "(defaults)", ", ".join(str(s) for s in seeds_of[v])]
        for key, _ in METRICS:
            c = cells[v].get(key)
            row.append(c.text(digits) if c else "-")
            if v == REFERENCE:
                row.append("(reference)")
            elif c and ref and key in ref:
                row.append(_signed(c.mean - ref[key].mean, digits))
            else:
                row.append("-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
