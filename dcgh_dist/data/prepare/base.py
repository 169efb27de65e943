"""What every input layout produces: the items that pass the metadata checks, and class names.

A layout module (``mirflickr``, ``nuswide``, ``coco``, ``listfile``) reads only the light files
(lists, tags, annotations) and returns a :class:`SourceScan`. Images are read later, in parallel,
by the pipeline. Items dropped at this stage are counted in the :class:`~.report.SkipReport`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dcgh_dist.data.prepare.images import ImageOptions


@dataclass(frozen=True, slots=True)
class Row:
    """One output row of an item (an item has several when one image has several captions)."""

    id: int
    labels: tuple[int, ...]
    text: str


@dataclass(frozen=True, slots=True)
class Candidate:
    """An item that passed the metadata checks; its image is still to be read and decoded."""

    id: int  # orders the item (seeded hash) and names it in the report
    image: str  # path relative to SourceScan.image_root
    rows: tuple[Row, ...]
    source: str  # how the report refers to it (the image path, usually)


@dataclass
class SourceScan:
    layout: str
    class_names: tuple[str, ...]
    candidates: list[Candidate]
    items_seen: int  # items in the source before any check
    image_root: str  # URI that Candidate.image paths are relative to
    description: str
    details: dict[str, Any] = field(default_factory=dict)  # provenance for dataset.json


@dataclass(frozen=True)
class LayoutOptions:
    """Layout-specific knobs (each layout reads the ones it knows)."""

    dataset: str
    s3_endpoint: str | None = None
    image_root: str | None = None  # list layout / NUS-WIDE: where image paths are relative to
    min_tag_images: int = 20  # MIRFLICKR: vocabulary = tags in at least this many images
    top_k: int | None = None  # NUS-WIDE: keep the k most frequent concepts
    nus_text: str = "auto"  # NUS-WIDE: alltags | tags1k | auto
    coco_captions: str = "first"  # COCO: first | join | all
    class_names_file: str | None = None  # list layout
    num_classes: int | None = None  # list layout: expected label columns (the preset's)
    image: ImageOptions = field(default_factory=ImageOptions)


def sort_labels(labels) -> tuple[int, ...]:
    return tuple(sorted(set(int(x) for x in labels)))
