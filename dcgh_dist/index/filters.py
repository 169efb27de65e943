"""What a search may return: a label filter (any-of / all-of over the dataset's classes) and an id
allow-list, and the per-shard view a filtered or tombstoned search works on.

A shard's items have *positions* (the order FAISS holds them in: id order for flat and multihash
shards, inverted-list order for IVF). A :class:`ShardView` maps ids to positions, holds the
shard's tombstones and labels in position order and, where a search needs them, its codes: every
filter becomes one boolean mask over positions, and the search path then depends only on how
many items the mask allows (see :meth:`dcgh_dist.index.search.ShardedIndex.search`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class SearchFilter:
    """Items whose labels include any of ``labels_any``, all of ``labels_all``, and whose id is in
    ``ids``; each part that is given must hold (None: no condition). Class indices are 0-based, as
    in the dataset's ``labels`` column."""

    labels_any: tuple[int, ...] | None = None
    labels_all: tuple[int, ...] | None = None
    ids: np.ndarray | None = None  # sorted, unique int64

    @classmethod
    def of(cls, labels_any: Sequence[int] | None = None, labels_all: Sequence[int] | None = None,
           ids: Sequence[int] | np.ndarray | None = None) -> SearchFilter | None:
        """A filter from plain lists; None when nothing is asked (an unfiltered search)."""
        if labels_any is None and labels_all is None and ids is None:
            return None

        def classes(v, name):
            if v is None:
                return None
            out = tuple(int(c) for c in v)
            if not out:
                raise ValueError(f"filter {name}: give at least one class index (or leave it out)")
            return out

        ids_arr = None if ids is None else np.unique(np.asarray(ids, dtype=np.int64))
        return cls(classes(labels_any, "labels_any"), classes(labels_all, "labels_all"), ids_arr)

    @property
    def needs_labels(self) -> bool:
        return self.labels_any is not None or self.labels_all is not None

    def check(self, num_classes: int | None, where: str) -> None:
        if not self.needs_labels:
            return
        if num_classes is None:
            raise ValueError(f"{where}: this index has no labels, so it cannot filter by label; rebuild it "
                             "with --labels DATASET (jobs/build_index.py)")
        for name in ("labels_any", "labels_all"):
            bad = [c for c in getattr(self, name) or () if not 0 <= c < num_classes]
            if bad:
                raise ValueError(f"filter {name}: class {bad[0]} is not one of the index's {num_classes} "
                                 f"classes (0..{num_classes - 1})")

    def label_mask(self, rows: np.ndarray, num_classes: int) -> np.ndarray:
        """Which packed multi-hot ``rows`` pass the label conditions."""
        ok = np.ones(len(rows), dtype=bool)
        for cond, need_all in ((self.labels_any, False), (self.labels_all, True)):
            if cond is None:
                continue
            bits = np.zeros(num_classes, dtype=bool)
            bits[list(cond)] = True
            m = np.packbits(bits)
            hit = rows & m
            ok &= (hit == m).all(axis=1) if need_all else hit.any(axis=1)
        return ok


class ShardView:
    """Id <-> position maps, tombstones, labels and codes of one open shard, built on first use
    (a search that needs none of them costs nothing). Thread-safe; read-only once built.

    Memory: an offset shard's maps are arithmetic; an id-keeping shard keeps a sorted copy of its
    ids (8 bytes/item). Codes are views of the (mapped) index for flat and multihash shards; an
    IVF shard's codes are gathered out of its inverted lists into memory (``bits / 8`` bytes/item)
    the first time a selective filter scans them.
    """

    def __init__(self, index, entry, *, deleted: np.ndarray, labels: np.ndarray | None, relaxed=None):
        self.index, self.entry = index, entry
        self._deleted_ids = deleted
        self._labels_by_id = labels  # id order, as stored
        self._relaxed_loader = relaxed  # () -> (rows, bits) float16 in id order; read on first use
        self._lock = threading.RLock()  # one part is built from another (labels from the id order)
        self._cache: dict = {}

    @property
    def rows(self) -> int:
        return self.entry.rows

    @property
    def num_deleted(self) -> int:
        return len(self._deleted_ids)

    def _get(self, name: str, build):
        v = self._cache.get(name)
        if v is None:
            with self._lock:
                v = self._cache.get(name)
                if v is None:
                    v = self._cache[name] = build()
        return v

    # -- ids and positions ------------------------------------------------------------------

    def position_ids(self) -> np.ndarray:
        """The id at each position."""
        import faiss

        def build():
            e = self.entry
            if e.id_layout == "offset":
                return np.arange(e.id_offset, e.id_offset + e.rows, dtype=np.int64)
            ix = self.index
            if isinstance(ix, faiss.IndexBinaryIDMap):
                return faiss.vector_to_array(ix.id_map).astype(np.int64)
            if isinstance(ix, faiss.IndexBinaryIVF):
                lists = ix.invlists
                out = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                       for i in range(ix.nlist) if lists.list_size(i)]
                return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)
            raise TypeError(f"cannot list the ids of a {type(ix).__name__}")

        return self._get("position_ids", build)

    def _sorted(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids sorted, the position of each; None where positions are already in id order)."""
        def build():
            pos_ids = self.position_ids()
            if len(pos_ids) < 2 or bool((pos_ids[1:] > pos_ids[:-1]).all()):
                return pos_ids, None
            order = np.argsort(pos_ids, kind="stable")
            return pos_ids[order], order

        return self._get("sorted", build)

    def positions_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions, found): where each of ``ids`` is in this shard; ``found`` False where not."""
        ids = np.asarray(ids, dtype=np.int64)
        e = self.entry
        if e.id_layout == "offset":
            pos = ids - e.id_offset
            found = (pos >= 0) & (pos < e.rows)
            return np.where(found, pos, 0), found
        srt, order = self._sorted()
        if not len(srt):
            return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
        j = np.clip(np.searchsorted(srt, ids), 0, len(srt) - 1)
        found = srt[j] == ids
        return (j if order is None else order[j]), found

    # -- masks ---------------------------------------------------------------------------------

    def live(self) -> np.ndarray | None:
        """Position mask of the items not deleted; None when none is."""
        if not self.num_deleted:
            return None

        def build():
            mask = np.ones(self.rows, dtype=bool)
            pos, found = self.positions_of(self._deleted_ids)
            mask[pos[found]] = False
            return mask

        return self._get("live", build)

    def labels(self) -> np.ndarray:
        """Packed multi-hot label rows in position order."""
        if self._labels_by_id is None:
            raise ValueError(f"shard {self.entry.uri} has no labels file")

        def build():
            _, order = self._sorted()
            if order is None:
                return self._labels_by_id
            out = np.empty_like(self._labels_by_id)
            out[order] = self._labels_by_id
            return out

        return self._get("labels", build)

    def allowed(self, flt: SearchFilter | None, num_classes: int | None) -> np.ndarray | None:
        """Position mask of what a search with ``flt`` may return here (None: everything)."""
        mask = self.live()
        if flt is None:
            return mask
        mask = np.ones(self.rows, dtype=bool) if mask is None else mask.copy()
        if flt.ids is not None:
            pos, found = self.positions_of(flt.ids)
            keep = np.zeros(self.rows, dtype=bool)
            keep[pos[found]] = True
            mask &= keep
        if flt.needs_labels:
            mask &= flt.label_mask(self.labels(), num_classes)
        return mask

    @property
    def has_relaxed(self) -> bool:
        return self._relaxed_loader is not None

    def relaxed(self) -> np.ndarray:
        """Relaxed (tanh) codes in position order, float16 (memory-mapped where the file is local)."""
        if self._relaxed_loader is None:
            raise ValueError(f"shard {self.entry.uri} has no relaxed codes (encode with --relaxed)")

        def build():
            by_id = self._relaxed_loader()
            _, order = self._sorted()
            if order is None:
                return by_id
            out = np.empty(by_id.shape, by_id.dtype)
            out[order] = by_id
            return out

        return self._get("relaxed", build)

    # -- codes ---------------------------------------------------------------------------------

    def flat(self):
        """The shard's IndexBinaryFlat (positions = this view's), or None for IVF/multihash."""
        import faiss

        ix = self.index
        if isinstance(ix, faiss.IndexBinaryIDMap):
            ix = faiss.downcast_IndexBinary(ix.index)
        return ix if isinstance(ix, faiss.IndexBinaryFlat) else None

    def codes(self) -> np.ndarray:
        """(rows, bits/8) uint8 codes in position order (a view where the index allows)."""
        import faiss

        def build():
            ix = self.index
            if isinstance(ix, faiss.IndexBinaryIDMap):
                ix = faiss.downcast_IndexBinary(ix.index)
            if isinstance(ix, faiss.IndexBinaryMultiHash):
                ix = faiss.downcast_IndexBinary(ix.storage)
            cs = ix.code_size
            if isinstance(ix, faiss.IndexBinaryFlat):
                return faiss.rev_swig_ptr(ix.xb.data(), ix.ntotal * cs).reshape(ix.ntotal, cs)
            if isinstance(ix, faiss.IndexBinaryIVF):
                lists = ix.invlists
                out = [faiss.rev_swig_ptr(lists.get_codes(i), lists.list_size(i) * cs).reshape(-1, cs).copy()
                       for i in range(ix.nlist) if lists.list_size(i)]
                return np.concatenate(out) if out else np.zeros((0, cs), np.uint8)
            raise TypeError(f"cannot read the codes of a {type(ix).__name__}")

        return self._get("codes", build)

    def live_contents(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(ids, codes, label rows or None, relaxed codes or None) of the items not deleted, in id
        order: what a compaction rewrites."""
        keep = self.live()
        if keep is None:
            keep = np.ones(self.rows, dtype=bool)
        order = np.argsort(self.position_ids()[keep], kind="stable")

        def pick(a):
            return None if a is None else np.ascontiguousarray(np.asarray(a)[keep][order])

        return (pick(self.position_ids()), pick(self.codes()),
                pick(self.labels() if self._labels_by_id is not None else None),
                pick(self.relaxed() if self.has_relaxed else None))
