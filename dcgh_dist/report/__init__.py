"""Reports over finished training runs: one table and the figures that explain it.

    from dcgh_dist.report import build_report
    build_report(["runs/a", "runs/b"], "reports/ab")   # report.md, report.html, report.json, figures/

``runs`` reads and checks run directories (refusing runs scored on different data), ``table``
aggregates metrics.json into rows method x bits, ``codes`` re-encodes the query split and a capped
database in this process (no Ray), ``curves`` holds the plain functions on codes, ``figures`` draws,
``render`` writes Markdown and a self-contained HTML page. Entry point: ``jobs/report.py``;
what the report shows: docs/REPORT.md.
"""

from dcgh_dist.report.build import DEFAULT_MAX_ITEMS, DEFAULT_TSNE_POINTS, build_report, write_report
from dcgh_dist.report.runs import RunError, load_run, load_runs

__all__ = ["DEFAULT_MAX_ITEMS", "DEFAULT_TSNE_POINTS", "RunError", "build_report", "load_run", "load_runs",
           "write_report"]
