"""The skip report: every item, annotation or line that did not become a row, by reason.

Nothing is dropped silently. Each reason has a *kind*:

- ``protocol``: the dataset's usual protocol drops the item (no label among the classes, no tags);
- ``error``: the input is broken (a missing or undecodable image, a tag file that does not line up);
- ``ignored``: an annotation entry or a line that could not be used; the item itself may still be
  kept (an annotation naming an image that does not exist, say).

The report keeps counts and, per reason, the smallest ids with a short detail, so a bad item can
be found in the source tree. It holds no timestamps: the same run gives the same report.
"""

from __future__ import annotations

import heapq
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

REPORT_FILE = "prepare_report.json"
EXAMPLES_PER_REASON = 20

# reason -> (kind, what it means)
REASONS: dict[str, tuple[str, str]] = {
    "no_label": ("protocol", "no label among the dataset's classes"),
    "empty_text": ("protocol", "no text: no tags / captions, or only whitespace"),
    "no_frequent_tag": ("protocol", "none of the item's tags is in the tag vocabulary"),
    "image_missing": ("error", "image file not found"),
    "image_unreadable": ("error", "image file could not be read"),
    "image_truncated": ("error", "image file is truncated"),
    "image_undecodable": ("error", "image file cannot be decoded (empty, corrupt or not an image)"),
    "image_path_empty": ("error", "empty image path in the list"),
    "tags_missing": ("error", "no tag file for the image"),
    "tags_misaligned": ("error", "the tag line belongs to another image"),
    "tags_malformed": ("error", "tag row with the wrong number of columns or values other than 0/1"),
    "text_not_utf8": ("error", "text is not valid UTF-8"),
    "label_row_malformed": ("error", "label row with the wrong number of columns or values other than 0/1"),
    "annotation_bad_line": ("ignored", "annotation line that is not an image number"),
    "annotation_unknown_image": ("ignored", "annotation for an image that is not in the dataset"),
    "annotation_unknown_category": ("ignored", "annotation with a category id not in the category list"),
    "duplicate_image": ("ignored", "image listed twice; the first listing is used"),
}

KINDS = ("protocol", "error", "ignored")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass
class _Reason:
    count: int = 0
    # max-heap (by -id) of the smallest ids seen: (-id, seq, source, detail)
    examples: list = field(default_factory=list)


class SkipReport:
    """Counts and first examples of everything that did not become a row."""

    def __init__(self, examples_per_reason: int = EXAMPLES_PER_REASON):
        self.k = examples_per_reason
        self._reasons: dict[str, _Reason] = {}
        self._seq = 0

    def add(self, reason: str, item_id: int | None, source: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise KeyError(f"unknown skip reason {reason!r}; add it to report.REASONS")
        r = self._reasons.setdefault(reason, _Reason())
        r.count += 1
        # Keep the k smallest ids, whatever order items arrive in (images arrive in seeded
        # order): the report is then the same for any processing order.
        key = -(item_id if item_id is not None else -1)
        self._seq += 1
        # Object addresses ("<... at 0x7f...>") in exception texts differ run to run.
        entry = (key, -self._seq, source, _ADDRESS.sub("", detail)[:300])
        if len(r.examples) < self.k:
            heapq.heappush(r.examples, entry)
        elif entry > r.examples[0]:
            heapq.heapreplace(r.examples, entry)

    def count(self, reason: str) -> int:
        r = self._reasons.get(reason)
        return r.count if r else 0

    def total(self, kind: str | None = None) -> int:
        return sum(r.count for name, r in self._reasons.items() if kind is None or REASONS[name][0] == kind)

    @property
    def reasons(self) -> dict[str, int]:
        return {name: r.count for name, r in sorted(self._reasons.items())}

    def first_ids(self, reason: str) -> list[int | None]:
        return [e["id"] for e in self._examples(reason)]

    def _examples(self, reason: str) -> list[dict[str, Any]]:
        r = self._reasons.get(reason)
        if not r:
            return []
        out = []
        for key, neg_seq, source, detail in sorted(r.examples, key=lambda e: (-e[0], -e[1])):
            out.append({"id": None if key == 1 else -key, "source": source, "detail": detail})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            name: {
                "kind": REASONS[name][0],
                "description": REASONS[name][1],
                "count": r.count,
                "first": self._examples(name),
            }
            for name, r in sorted(self._reasons.items(), key=lambda kv: (KINDS.index(REASONS[kv[0]][0]), kv[0]))
        }

    def summary(self) -> str:
        """A short human-readable table of the reasons (for the job's output)."""
        if not self._reasons:
            return "nothing skipped"
        lines = [f"{'reason':<28} {'kind':<9} {'count':>9}  first ids"]
        for name, d in self.to_dict().items():
            ids = ", ".join("?" if e["id"] is None else str(e["id"]) for e in d["first"][:5])
            lines.append(f"{name:<28} {d['kind']:<9} {d['count']:>9}  {ids}")
        return "\n".join(lines)


def report_json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
