"""Seeded, reproducible train/val/query/db splits, assigned while streaming.

The order in which items are processed (and written) is a seeded hash of each item's id, not a
permutation of positions: an item's place in the order depends only on ``(seed, id)``. So the
order is the same on every machine and numpy version, and an item that appears or disappears
(a missing image that is later restored, say) does not reshuffle every other item.

Splits are handed out along that order to the items that survive every check: the first
``query`` kept items are the queries, the next ``val`` the validation set, the next ``train`` the
training set and the rest ``db``. Since the order is a uniformly random permutation, each split is
a uniformly random subset, its size is exact even when images turn out to be unreadable halfway
through, and it is decided without a second pass over the images. ``val`` is carved from the
non-query rows without touching the training-set size of the paper's protocol; like ``train`` it
is part of the retrieval database (every split but ``query``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Sequence, TypeVar

T = TypeVar("T")

# The order splits are filled in. db takes whatever is left.
FILL_ORDER = ("query", "val", "train")


def order_key(seed: int, item_id: int) -> bytes:
    """The sort key of one item: 8 bytes of BLAKE2b over ``"seed:id"`` (stable everywhere)."""
    return hashlib.blake2b(f"{int(seed)}:{int(item_id)}".encode(), digest_size=8).digest()


def seeded_order(items: Iterable[T], seed: int, key=lambda item: item.id) -> list[T]:
    """``items`` sorted by their seeded hash (ties, which need a 64-bit collision, by id)."""
    return sorted(items, key=lambda it: (order_key(seed, key(it)), key(it)))


@dataclass(frozen=True)
class SplitSizes:
    """How many items go to each split; everything else is ``db``."""

    query: int
    train: int
    val: int = 0

    def __post_init__(self) -> None:
        for name in FILL_ORDER:
            if getattr(self, name) < 0:
                raise ValueError(f"split size --{name} must be >= 0, got {getattr(self, name)}")

    @property
    def required(self) -> int:
        """Items needed to fill query, val and train (db may be empty)."""
        return self.query + self.val + self.train

    def as_dict(self) -> dict[str, int]:
        return {"query": self.query, "val": self.val, "train": self.train}


class SplitAssigner:
    """Hands out the next split to each kept item, in processing order."""

    def __init__(self, sizes: SplitSizes):
        self.sizes = sizes
        self.counts = {"query": 0, "val": 0, "train": 0, "db": 0}  # items, not rows

    def next(self) -> str:
        for name in FILL_ORDER:
            if self.counts[name] < getattr(self.sizes, name):
                self.counts[name] += 1
                return name
        self.counts["db"] += 1
        return "db"

    @property
    def assigned(self) -> int:
        return sum(self.counts.values())

    def shortfall(self) -> dict[str, int]:
        """Splits that could not be filled (name -> missing items); empty when all were."""
        return {
            name: getattr(self.sizes, name) - self.counts[name]
            for name in FILL_ORDER
            if self.counts[name] < getattr(self.sizes, name)
        }


def assign_splits(ids: Sequence[int], sizes: SplitSizes, seed: int) -> dict[int, str]:
    """Split of each id when every one of them is kept (a convenience for tests and tools)."""
    assigner = SplitAssigner(sizes)
    return {i: assigner.next() for i in seeded_order(ids, seed, key=lambda x: x)}
