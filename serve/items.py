"""Captions and images by id, straight from a dataset's Parquet files.

A replica never loads the dataset: it keeps, per row group, the id range from the Parquet footer
statistics (a few bytes per row group, whatever the row count), and reads one row group's ids,
then the one row it needs, when asked. At a billion rows in 64 MiB row groups that is a few
hundred thousand ranges.
"""

from __future__ import annotations

import bisect
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from dcgh_dist.data.format import list_data_files, read_dataset_info
from dcgh_dist.storage import resolve_filesystem

THUMBNAIL_SIDE = 256


@dataclass(frozen=True)
class _Group:
    lo: int
    hi: int
    file: int
    row_group: int


class ItemStore:
    """``caption(id)``, ``image(id)``, ``thumbnail(id)`` of a dataset (local or ``s3://``)."""

    def __init__(self, uri: str, s3_endpoint: str | None = None, cache_groups: int = 64):
        self.info = read_dataset_info(uri, s3_endpoint)
        self.fs, _ = resolve_filesystem(uri, s3_endpoint)
        self.files = list_data_files(uri, s3_endpoint)
        groups = []
        for fi, path in enumerate(self.files):
            md = pq.read_metadata(path, filesystem=self.fs)
            col = md.schema.names.index("id")
            for rg in range(md.num_row_groups):
                stats = md.row_group(rg).column(col).statistics
                if stats is not None and stats.has_min_max:
                    lo, hi = int(stats.min), int(stats.max)
                else:  # no statistics written: read this row group's ids once
                    ids = self._ids(fi, rg)
                    lo, hi = (int(ids.min()), int(ids.max())) if len(ids) else (0, -1)
                groups.append(_Group(lo, hi, fi, rg))
        self._groups = sorted(groups, key=lambda g: (g.lo, g.hi))
        self._los = [g.lo for g in self._groups]
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_size = cache_groups
        self._lock = threading.Lock()
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()

    def _ids(self, file: int, row_group: int) -> np.ndarray:
        key = (file, row_group)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        pf = pq.ParquetFile(self.files[file], filesystem=self.fs)
        ids = pf.read_row_group(row_group, columns=["id"]).column("id").to_numpy()
        with self._lock:
            self._cache[key] = ids
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return ids

    def _locate(self, item_id: int) -> tuple[int, int, int] | None:
        """(file, row group, row) of an id, or None."""
        end = bisect.bisect_right(self._los, item_id)
        for g in self._groups[:end][::-1]:
            if g.lo <= item_id <= g.hi:
                rows = np.flatnonzero(self._ids(g.file, g.row_group) == item_id)
                if rows.size:
                    return g.file, g.row_group, int(rows[0])
        return None

    def _value(self, item_id: int, column: str):
        where = self._locate(item_id)
        if where is None:
            raise KeyError(item_id)
        file, rg, row = where
        pf = pq.ParquetFile(self.files[file], filesystem=self.fs)
        return pf.read_row_group(rg, columns=[column]).column(column)[row].as_py()

    def caption(self, item_id: int) -> str | None:
        if self.info.text_column != "text":
            return None
        return self._value(item_id, "text")

    def captions(self, ids) -> list[str | None]:
        """Captions of many ids (None where unknown), one read per row group they fall in."""
        if self.info.text_column != "text":
            return [None] * len(ids)
        where = [self._locate(int(i)) for i in ids]
        columns = {}
        for w in where:
            if w is not None and w[:2] not in columns:
                pf = pq.ParquetFile(self.files[w[0]], filesystem=self.fs)
                columns[w[:2]] = pf.read_row_group(w[1], columns=["text"]).column("text")
        return [None if w is None else columns[w[:2]][w[2]].as_py() for w in where]

    def image(self, item_id: int) -> bytes | None:
        if self.info.image_column != "image":
            return None
        return self._value(item_id, "image")

    def thumbnail(self, item_id: int) -> bytes | None:
        """A JPEG of at most THUMBNAIL_SIDE pixels a side (cached), or None without images."""
        with self._lock:
            if item_id in self._thumbs:
                return self._thumbs[item_id]
        data = self.image(item_id)
        if data is None:
            return None
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert("RGB")
        img.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        out = buf.getvalue()
        with self._lock:
            self._thumbs[item_id] = out
            if len(self._thumbs) > 4096:
                self._thumbs.popitem(last=False)
        return out
