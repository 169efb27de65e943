"""The dcgh-dist dataset format: ``dataset.json`` + Parquet files, on local disk or S3.

See docs/DATASET_FORMAT.md for the user-facing description. In short, a dataset is a directory or
S3 prefix holding ``dataset.json`` and one or more ``*.parquet`` files (any depth) whose columns are

    id      int64, unique across the dataset
    labels  list<int32>, 0-based class indices, at least one
    split   string: train | val | query | db   (retrieval database = every split but query)
    image   binary (encoded JPEG/PNG)      or  image_features  list<float32>, fixed length
    text    string                         or  text_features   list<float32>, fixed length

Validation errors name the file, the row id and the column, so a bad row can be found and fixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Iterable, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dcgh_dist.storage import display, join, read_text, resolve_filesystem, write_text_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "query", "db")
INFO_FILE = "dataset.json"
# Splits that make up the retrieval database: everything but the queries.
DATABASE_SPLITS = ("train", "val", "db")


class DatasetError(ValueError):
    """A dataset that does not follow the format; the message says what and where."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    class_names: tuple[str, ...]
    image_column: Literal["image", "image_features"] = "image"
    text_column: Literal["text", "text_features"] = "text"
    image_feature_dim: int | None = None
    text_feature_dim: int | None = None
    description: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self):
        if self.num_classes < 1:
            raise DatasetError(f"dataset.json: num_classes must be >= 1, got {self.num_classes}")
        if len(self.class_names) != self.num_classes:
            raise DatasetError(
                f"dataset.json: {len(self.class_names)} class_names for num_classes={self.num_classes}"
            )
        if self.image_column not in ("image", "image_features"):
            raise DatasetError(f"dataset.json: unknown image form {self.image_column!r}")
        if self.text_column not in ("text", "text_features"):
            raise DatasetError(f"dataset.json: unknown text form {self.text_column!r}")

    @property
    def columns(self) -> list[str]:
        return ["id", "labels", "split", self.image_column, self.text_column]

    def to_json(self) -> str:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        d["modalities"] = {"image": d.pop("image_column"), "text": d.pop("text_column")}
        return json.dumps(d, indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, where: str = INFO_FILE) -> "DatasetInfo":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: not valid JSON ({e})") from e
        missing = [k for k in ("name", "num_classes", "class_names") if k not in d]
        if missing:
            raise DatasetError(f"{where}: missing key(s) {missing}")
        mods = d.pop("modalities", {})
        known = {"name", "num_classes", "class_names", "image_feature_dim", "text_feature_dim",
                 "description", "format_version", "extra"}
        extra = {k: v for k, v in d.items() if k not in known}
        kw = {k: v for k, v in d.items() if k in known}
        kw["class_names"] = tuple(kw["class_names"])
        kw["extra"] = {**kw.get("extra", {}), **extra}
        return cls(
            image_column=mods.get("image", "image"), text_column=mods.get("text", "text"), **kw
        )


def read_dataset_info(uri: str, s3_endpoint: str | None = None) -> DatasetInfo:
    fs, root = resolve_filesystem(uri, s3_endpoint)
    path = join(root, INFO_FILE)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise DatasetError(f"{uri}: no {INFO_FILE} (is this a dcgh-dist dataset? see docs/DATASET_FORMAT.md)")
    return DatasetInfo.from_json(read_text(fs, path), where=f"{uri}/{INFO_FILE}")


def list_data_files(uri: str, s3_endpoint: str | None = None) -> list[str]:
    """All Parquet files under the dataset root, sorted (paths as the filesystem names them)."""
    fs, root = resolve_filesystem(uri, s3_endpoint)
    sel = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    files = sorted(
        f.path for f in fs.get_file_info(sel)
        if f.type == pafs.FileType.File and f.path.endswith(".parquet")
    )
    if not files:
        raise DatasetError(f"{uri}: no .parquet files found")
    return files


# --------------------------------------------------------------------------------------------
# Validation


def _row_id(ids: np.ndarray, i: int) -> str:
    return str(ids[i]) if i < len(ids) else f"#{i}"


def validate_table(table: pa.Table, info: DatasetInfo, where: str, *, row_offset: int = 0) -> None:
    """Check one file's (or batch's) rows; raise DatasetError naming file, row id and column.

    Heavy payload columns (encoded images, captions) are checked when decoded; here we check
    what can be checked without decoding. Columns not present in ``table`` are skipped, so the
    same check serves a scan of the light columns only.
    """
    names = set(table.column_names)
    if "id" not in names:
        raise DatasetError(f"{where}: missing column 'id'")
    id_col = table.column("id")
    if not pa.types.is_integer(id_col.type):
        raise DatasetError(f"{where}: column 'id' must be int64, got {id_col.type}")
    if id_col.null_count:
        bad = pc.index(pc.is_null(id_col), True).as_py()
        raise DatasetError(f"{where}: row #{bad + row_offset}: column 'id' is null")
    ids = id_col.to_numpy()

    if "labels" in names:
        col = table.column("labels")
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
            raise DatasetError(f"{where}: column 'labels' must be list<int32>, got {col.type}")
        lens = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
        empty = np.flatnonzero(lens == 0)
        if empty.size:
            raise DatasetError(
                f"{where}: row id {_row_id(ids, empty[0])}: column 'labels' is empty "
                f"({empty.size} such rows); every row needs at least one label"
            )
        flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero((flat < 0) | (flat >= info.num_classes))
        if bad.size:
            owner = np.searchsorted(np.cumsum(lens), bad[0], side="right")
            raise DatasetError(
                f"{where}: row id {_row_id(ids, owner)}: column 'labels' has {int(flat[bad[0]])}, "
                f"outside 0..{info.num_classes - 1}"
            )

    if "split" in names:
        split = table.column("split")
        ok = pc.is_in(split, value_set=pa.array(SPLITS)).fill_null(False)
        if not pc.all(ok).as_py():
            i = pc.index(ok, False).as_py()
            raise DatasetError(
                f"{where}: row id {_row_id(ids, i)}: column 'split' is {split[i].as_py()!r}, "
                f"expected one of {list(SPLITS)}"
            )

    for col_name, dim in (
        ("image_features", info.image_feature_dim),
        ("text_features", info.text_feature_dim),
    ):
        if col_name not in names:
            continue
        lens = pc.list_value_length(table.column(col_name)).fill_null(-1).to_numpy(zero_copy_only=False)
        expected = dim if dim else (int(lens[0]) if len(lens) else 0)
        bad = np.flatnonzero(lens != expected)
        if bad.size:
            raise DatasetError(
                f"{where}: row id {_row_id(ids, bad[0])}: column {col_name!r} has length "
                f"{int(lens[bad[0]])}, expected {expected} (ragged or null features)"
            )


def _is_list_of(t: pa.DataType, pred) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and pred(t.value_type)


# What each column may be stored as (a narrower or wider Arrow type of the same kind is fine;
# another kind would be silently reinterpreted or fail deep inside a Ray worker).
_COLUMN_TYPES = {
    "id": ("int64 (any integer type)", pa.types.is_integer),
    "labels": ("list<int32> (a list of any integer type)", lambda t: _is_list_of(t, pa.types.is_integer)),
    "split": ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)
              or (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type))),
    "image": ("binary (encoded JPEG/PNG bytes)", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)),
    "text": ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    "image_features": ("list<float32>", lambda t: _is_list_of(t, pa.types.is_floating)),
    "text_features": ("list<float32>", lambda t: _is_list_of(t, pa.types.is_floating)),
}


def check_schema(schema: pa.Schema, info: DatasetInfo, where: str) -> None:
    """Each format column has a type of the right kind; the message names file, column, types."""
    for name in info.columns:
        expected, ok = _COLUMN_TYPES[name]
        t = schema.field(name).type
        if not ok(t):
            raise DatasetError(f"{where}: column {name!r} is {t}, expected {expected}")


def first_duplicate(ids: np.ndarray) -> tuple[int, int] | None:
    """(id, count) of the smallest id that appears more than once, or None: ids must be unique
    across a dataset, its code shards and its indexes, and every check of that uses this."""
    uniq, counts = np.unique(np.asarray(ids), return_counts=True)
    dup = np.flatnonzero(counts > 1)
    return (int(uniq[dup[0]]), int(counts[dup[0]])) if dup.size else None


def overlapping_ranges(ranges: Sequence[tuple[int, int] | None]) -> list[int]:
    """Indices of the inclusive (lo, hi) id ranges that overlap another one (None = empty).

    Ids can only repeat across files (or shards) whose ranges overlap, so a uniqueness check reads
    back the ids of these alone: after a sort by id the common case, none."""
    order = sorted((r, i) for i, r in enumerate(ranges) if r is not None)
    out: set[int] = set()
    hi, hi_i = None, None
    for (lo, top), i in order:
        if hi is not None and lo <= hi:
            out.update({i, hi_i})
        if hi is None or top > hi:
            hi, hi_i = top, i
    return sorted(out)


@dataclass
class DatasetScan:
    """What a cheap pass over the light columns tells us (no images decoded)."""

    info: DatasetInfo
    files: list[str]
    split_counts: dict[str, int]
    rows_per_file: dict[str, int]
    # sha256 of dataset.json's classes and columns and of every row's id, split and labels, in
    # file order: what anything derived from the training rows (DAPH's proxy codes) is tied to.
    fingerprint: str = ""

    @property
    def num_rows(self) -> int:
        return sum(self.split_counts.values())


def scan_dataset(uri: str, s3_endpoint: str | None = None, *, check_ids: bool = True) -> DatasetScan:
    """Validate every file's schema and light columns; count rows per split.

    Reads only ``id``, ``labels``, ``split`` (and feature columns for the features form, whose
    lengths must be checked): cheap next to the image payloads, and it catches a bad label before
    hours of training rather than during them.
    """
    info = read_dataset_info(uri, s3_endpoint)
    fs, _ = resolve_filesystem(uri, s3_endpoint)
    files = list_data_files(uri, s3_endpoint)
    counts = {s: 0 for s in SPLITS}
    per_file: dict[str, int] = {}
    seen_ids: list[np.ndarray] = []
    digest = hashlib.sha256(json.dumps([info.num_classes, list(info.class_names), info.columns]).encode())
    light = ["id", "labels", "split"] + [
        c for c in (info.image_column, info.text_column) if c.endswith("_features")
    ]
    for path in files:
        where = display(fs, path)
        try:
            schema = pq.read_schema(path, filesystem=fs)
        except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
            raise DatasetError(f"{where}: cannot read Parquet schema ({e})") from e
        missing = [c for c in info.columns if c not in schema.names]
        if missing:
            raise DatasetError(
                f"{where}: missing column(s) {missing}; dataset.json says the columns are {info.columns}"
            )
        check_schema(schema, info, where)
        table = pq.read_table(path, filesystem=fs, columns=light)
        validate_table(table, info, where)
        per_file[path] = table.num_rows
        labels = table.column("labels").combine_chunks()
        for part in (table.column("id").to_numpy().astype("<i8"), np.asarray(labels.offsets).astype("<i8"),
                     np.asarray(labels.flatten()).astype("<i8")):
            digest.update(part.tobytes())
        digest.update("\0".join(table.column("split").to_pylist()).encode())
        for s, n in zip(*np.unique(table.column("split").to_numpy(zero_copy_only=False), return_counts=True)):
            counts[str(s)] += int(n)
        if check_ids:
            seen_ids.append(table.column("id").to_numpy())
    if check_ids and seen_ids and (dup := first_duplicate(np.concatenate(seen_ids))):
        raise DatasetError(f"{uri}: id {dup[0]} appears {dup[1]} times; ids must be unique")
    return DatasetScan(info=info, files=files, split_counts=counts, rows_per_file=per_file,
                       fingerprint=digest.hexdigest()[:16])


# --------------------------------------------------------------------------------------------
# Writing


def dataset_schema(info: DatasetInfo) -> pa.Schema:
    image_type = pa.binary() if info.image_column == "image" else pa.list_(pa.float32())
    text_type = pa.string() if info.text_column == "text" else pa.list_(pa.float32())
    return pa.schema(
        [
            ("id", pa.int64()),
            ("labels", pa.list_(pa.int32())),
            ("split", pa.string()),
            (info.image_column, image_type),
            (info.text_column, text_type),
        ]
    )


def write_dataset(
    uri: str,
    info: DatasetInfo,
    rows: Iterable[dict] | pa.Table,
    *,
    rows_per_file: int = 1000,
    s3_endpoint: str | None = None,
) -> list[str]:
    """Write ``rows`` (dicts with the format's columns, or a table) as Parquet + dataset.json.

    dataset.json is written last, so a reader that finds it finds complete data files.
    """
    fs, root = resolve_filesystem(uri, s3_endpoint)
    fs.create_dir(root, recursive=True)
    schema = dataset_schema(info)
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows), schema=schema)
    table = table.select(schema.names).cast(schema)
    validate_table(table, info, uri)
    written = []
    n_files = max(1, -(-table.num_rows // rows_per_file))
    for i in range(n_files):
        part = table.slice(i * rows_per_file, rows_per_file)
        path = join(root, f"part-{i:05d}.parquet")
        pq.write_table(part, path, filesystem=fs, compression="zstd")
        written.append(path)
    write_text_atomic(fs, join(root, INFO_FILE), info.to_json())
    return written
