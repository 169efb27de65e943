"""A dataset's labels and splits by id: the one reader of the light columns (``id``, ``labels``,
``split``) that index builds, index evaluation, reports and the linear baseline share.

Rows are kept in id order, the database order :mod:`dcgh_dist.metrics` ranks ties by, and labels
bit-packed (``np.packbits`` of the multi-hot row, class c is bit c): with 80 classes a row holds
23 bytes (id 8, labels 10, split 1, first label 4), and files are read and packed one at a time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dcgh_dist.data.format import SPLITS, DatasetError, list_data_files, read_dataset_info
from dcgh_dist.storage import resolve_filesystem

COLUMNS = ("id", "labels", "split")


def labels_multihot(column, num_classes: int, dtype=np.float32) -> np.ndarray:
    """A ``labels`` column (list of class indices per row; pyarrow Array or ChunkedArray) as an
    (n, C) multi-hot matrix."""
    col = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    lens = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int64)
    out = np.zeros((len(col), num_classes), dtype=dtype)
    out[np.repeat(np.arange(len(col)), lens), flat] = 1
    return out


@dataclass
class LabelTable:
    """Labels and splits of a dataset, sorted by id."""

    ids: np.ndarray  # (N,) int64, sorted
    packed: np.ndarray  # (N, ceil(C / 8)) uint8, np.packbits of the multi-hot rows
    split: np.ndarray  # (N,) uint8 index into SPLITS
    first: np.ndarray  # (N,) int32, the first class of each row's list (its "main" label in plots)
    num_classes: int
    uri: str = ""

    @classmethod
    def read(cls, uri: str, s3_endpoint: str | None = None, *,
             files: Sequence[str] | None = None) -> "LabelTable":
        """The light columns of every data file (or of ``files``), read in parallel, no payloads."""
        info = read_dataset_info(uri, s3_endpoint)
        fs, _ = resolve_filesystem(uri, s3_endpoint)
        files = list(files) if files is not None else list_data_files(uri, s3_endpoint)
        if not files:
            raise DatasetError(f"{uri}: no data files to read labels from")

        def one(path: str) -> "LabelTable":
            t = pq.read_table(path, filesystem=fs, columns=list(COLUMNS))
            return cls.from_table(t, info.num_classes, f"{uri} ({path})", sort=False)

        with ThreadPoolExecutor(8) as pool:
            parts = list(pool.map(one, files))  # packed file by file: no dataset-wide (N, C) matrix
        # One sort, of all the files' rows together.
        ids = np.concatenate([p.ids for p in parts])
        order = np.argsort(ids, kind="stable")
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])[order]  # noqa: E731
        return cls(ids[order], cat("packed"), cat("split"), cat("first"), info.num_classes, uri)

    @classmethod
    def from_table(cls, table: pa.Table, num_classes: int, uri: str = "", *, sort: bool = True) -> "LabelTable":
        """From a table holding at least the light columns, in any order: sorted by id here
        unless ``sort=False`` (a part that :meth:`read` sorts with the others)."""
        ids = np.asarray(table.column("id"), dtype=np.int64)
        order = np.argsort(ids, kind="stable") if sort else slice(None)
        lab = table.column("labels").combine_chunks()
        split = pc.index_in(table.column("split"), value_set=pa.array(SPLITS))
        if split.null_count:
            bad = int(np.flatnonzero(np.asarray(split.is_null()))[0])
            raise DatasetError(f"{uri or 'dataset'}: row id {int(ids[bad])} has split "
                               f"{table.column('split')[bad].as_py()!r}, not one of {list(SPLITS)}")
        lens = pc.list_value_length(lab).fill_null(0).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(lab).to_numpy(zero_copy_only=False).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        first = np.full(len(lens), -1, dtype=np.int32)
        first[lens > 0] = flat[starts[lens > 0]]
        packed = np.packbits(labels_multihot(lab, num_classes, dtype=bool), axis=1)
        return cls(ids[order], packed[order], np.asarray(split, dtype=np.uint8)[order],
                   first[order], num_classes, uri)

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, ids: np.ndarray, what: str = "id") -> np.ndarray:
        """Positions of ``ids`` (any shape); an id with no row is an error naming it and the
        dataset."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self.ids):
            if ids.size:
                raise ValueError(f"{what} {int(ids.flat[0])}: the labels dataset {self.uri} has no rows")
            return np.zeros(ids.shape, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        bad = self.ids[pos] != ids
        if bad.any():
            raise ValueError(f"{what} {int(ids[bad].flat[0])} (and {int(bad.sum()) - 1} more) has no row in the "
                             f"labels dataset {self.uri}; pass the dataset the codes were encoded from")
        return pos

    def multihot(self, positions: np.ndarray, dtype=bool) -> np.ndarray:
        return np.unpackbits(self.packed[positions], axis=-1, count=self.num_classes).astype(dtype)

    def in_splits(self, names: Sequence[str]) -> np.ndarray:
        """Mask of the rows whose split is one of ``names``."""
        return np.isin(self.split, [SPLITS.index(s) for s in names])
