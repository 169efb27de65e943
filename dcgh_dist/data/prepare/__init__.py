"""Benchmark dataset preparation: MIRFLICKR-25K, NUS-WIDE and MS-COCO into sharded Parquet.

``prepare_dataset(PrepareOptions(...))`` is what ``jobs/prepare_data.py`` runs. One module per
input layout (``mirflickr``, ``nuswide``, ``coco``, ``listfile``), a streaming sharded writer with
a checksummed manifest (``writer``), seeded splits (``splits``) and the skip report (``report``).
User guide: docs/PREPARE_DATA.md.
"""

from dcgh_dist.data.prepare.pipeline import (
    PrepareError,
    PrepareOptions,
    PrepareResult,
    prepare_dataset,
    resolve_layout,
)
from dcgh_dist.data.prepare.report import REPORT_FILE, SkipReport
from dcgh_dist.data.prepare.splits import SplitSizes, assign_splits, order_key
from dcgh_dist.data.prepare.writer import verify_manifest

__all__ = [
    "PrepareError",
    "PrepareOptions",
    "PrepareResult",
    "REPORT_FILE",
    "SkipReport",
    "SplitSizes",
    "assign_splits",
    "order_key",
    "prepare_dataset",
    "resolve_layout",
    "verify_manifest",
]
