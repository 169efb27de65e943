"""Streaming sharded Parquet writer with a manifest of row counts and SHA-256 checksums.

Rows arrive one at a time in a fixed order; the writer buffers them into row groups of about
``row_group_bytes`` and starts a new shard when the next row would take the current one past
``shard_bytes``. Boundaries depend only on the rows and their sizes, never on timing, and the
Parquet settings are fixed (per-column compression, statistics, dictionary), so the same rows give
byte-identical shards. Only one row group is held in memory at a time.

Checksums are computed from the bytes as they are written (no second read, which on S3 would be
a second download). Each shard is written under a temporary name (``output.temp_name``) and moved
to its final name only once it is complete, so a final name never holds a partial shard; a
``before_publish`` callback (the run record, in the job) hears of each shard before the move.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dcgh_dist.data.format import DatasetInfo, dataset_schema, validate_table
from dcgh_dist.storage import join
from dcgh_dist.data.prepare.output import new_run_id, temp_name

logger = logging.getLogger(__name__)

SHARD_PATTERN = "part-{:05d}.parquet"
DEFAULT_SHARD_BYTES = 256 << 20
DEFAULT_ROW_GROUP_BYTES = 64 << 20
# Bytes a row costs beyond its image and text (id, labels, split, Parquet bookkeeping): only
# used to place shard boundaries, which need to be deterministic, not exact.
_ROW_OVERHEAD = 32


@dataclass
class DataShard:
    """One data shard (Parquet file) in the manifest of a prepared dataset."""

    path: str  # relative to the dataset root
    rows: int
    bytes: int
    sha256: str
    splits: dict[str, int] = field(default_factory=dict)
    id_min: int | None = None
    id_max: int | None = None


class _HashingSink:
    """File-like wrapper that hashes and counts what pyarrow writes through it."""

    def __init__(self, stream: Any):
        self._stream = stream
        self._hash = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        self._hash.update(data)
        self._stream.write(data)
        n = len(memoryview(data))
        self.size += n
        return n

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
            self.closed = True

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def parquet_writer_options(schema: pa.Schema) -> dict[str, Any]:
    """Fixed writer settings (part of the byte-identical guarantee).

    Encoded images are already compressed: zstd on them costs CPU for nothing, so that column is
    stored uncompressed. Statistics only on the light columns (min/max of image bytes are useless
    and would bloat the footer); ``split`` and ``id`` statistics let readers skip row groups.
    """
    payload = {"image", "image_features"}
    return {
        "compression": {n: ("NONE" if n in payload else "ZSTD") for n in schema.names},
        "compression_level": {n: 3 for n in schema.names if n not in payload},
        "use_dictionary": ["split"],
        "write_statistics": ["id", "split"],
        "version": "2.6",
        "data_page_size": 1 << 20,
    }


class ShardWriter:
    """Write rows into ``part-NNNNN.parquet`` shards under ``root`` on ``fs``."""

    def __init__(
        self,
        fs: pafs.FileSystem,
        root: str,
        info: DatasetInfo,
        *,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        row_group_bytes: int | None = None,
        display_root: str | None = None,
        run_id: str | None = None,
        before_publish: Callable[[DataShard], None] | None = None,
    ):
        if shard_bytes < 1:
            raise ValueError(f"shard size must be positive, got {shard_bytes}")
        self.fs, self.root, self.info = fs, root, info
        self.display_root = display_root or root
        self.run_id = run_id or new_run_id()  # names the temporary files
        self.before_publish = before_publish
        self.schema = dataset_schema(info)
        self.shard_bytes = shard_bytes
        self.row_group_bytes = min(row_group_bytes or DEFAULT_ROW_GROUP_BYTES, shard_bytes)
        self.shards: list[DataShard] = []
        self._buf: dict[str, list] = {n: [] for n in self.schema.names}
        self._buf_bytes = 0
        self._sink: _HashingSink | None = None
        self._writer: pq.ParquetWriter | None = None
        self._shard_bytes_so_far = 0
        self._shard_rows = 0
        self._shard_splits: dict[str, int] = {}
        self._shard_ids: tuple[int, int] | None = None
        self.rows_written = 0
        self.payload_bytes = 0

    # -- rows --------------------------------------------------------------------------------

    def add(self, row_id: int, labels: list[int], split: str, image: bytes, text: str) -> None:
        size = len(image) + len(text.encode("utf-8")) + _ROW_OVERHEAD
        if self._shard_rows and self._shard_bytes_so_far + size > self.shard_bytes:
            self._close_shard()
        if self._writer is None:
            self._open_shard()
        b = self._buf
        b["id"].append(row_id)
        b["labels"].append(labels)
        b["split"].append(split)
        b[self.info.image_column].append(image)
        b[self.info.text_column].append(text)
        self._buf_bytes += size
        self._shard_bytes_so_far += size
        self._shard_rows += 1
        self._shard_splits[split] = self._shard_splits.get(split, 0) + 1
        lo, hi = self._shard_ids or (row_id, row_id)
        self._shard_ids = (min(lo, row_id), max(hi, row_id))
        self.payload_bytes += size - _ROW_OVERHEAD
        if self._buf_bytes >= self.row_group_bytes:
            self._flush_row_group()

    def close(self) -> list[DataShard]:
        """Flush and close the last shard; the manifest entries, in shard order."""
        if self._writer is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Close and delete the shard being written, without recording it (the job failed).
        Shards already moved to their final names are the caller's (the run record lists them)."""
        try:
            if self._writer is not None:
                self._writer.close()
            if self._sink is not None:
                self._sink.close()
                self.fs.delete_file(join(self.root, temp_name(self._rel, self.run_id)))
        except Exception:  # noqa: BLE001 - best effort on the way out of a failure
            logger.debug("error while aborting shard writer", exc_info=True)
        self._writer = self._sink = None

    # -- internals ---------------------------------------------------------------------------

    def _open_shard(self) -> None:
        self._rel = SHARD_PATTERN.format(len(self.shards))
        self._sink = _HashingSink(self.fs.open_output_stream(join(self.root, temp_name(self._rel, self.run_id))))
        self._writer = pq.ParquetWriter(self._sink, self.schema, **parquet_writer_options(self.schema))
        self._shard_bytes_so_far = 0
        self._shard_rows = 0
        self._shard_splits = {}
        self._shard_ids = None

    def _flush_row_group(self) -> None:
        if not self._buf["id"]:
            return
        table = pa.Table.from_pydict(self._buf, schema=self.schema)
        # The same checks training runs (label range, split values), before the data is out.
        validate_table(table, self.info, f"{self.display_root}/{self._rel}")
        self._writer.write_table(table, row_group_size=table.num_rows)
        self.rows_written += table.num_rows
        self._buf = {n: [] for n in self.schema.names}
        self._buf_bytes = 0

    def _close_shard(self) -> None:
        self._flush_row_group()
        self._writer.close()
        self._sink.close()
        entry = DataShard(
            path=self._rel,
            rows=self._shard_rows,
            bytes=self._sink.size,
            sha256=self._sink.hexdigest(),
            splits=dict(sorted(self._shard_splits.items())),
            id_min=self._shard_ids[0] if self._shard_ids else None,
            id_max=self._shard_ids[1] if self._shard_ids else None,
        )
        if self.before_publish is not None:
            self.before_publish(entry)
        self.fs.move(join(self.root, temp_name(self._rel, self.run_id)), join(self.root, self._rel))
        self.shards.append(entry)
        logger.info("wrote %s/%s: %d rows, %.1f MB", self.display_root, self._rel, self._shard_rows,
                    self._sink.size / 1e6)
        self._writer = self._sink = None


def manifest_dict(shards: list[DataShard]) -> dict[str, Any]:
    return {
        "shards": [asdict(s) for s in shards],
        "total_rows": sum(s.rows for s in shards),
        "total_bytes": sum(s.bytes for s in shards),
        "checksum": "sha256",
    }


def verify_manifest(uri: str, s3_endpoint: str | None = None) -> list[str]:
    """Re-read every shard listed in dataset.json's manifest; the problems found (empty = fine).

    Checks that each listed shard exists with the recorded size, SHA-256 and row count, and that no
    unlisted Parquet file sits in the dataset (a leftover of another run would add rows).
    """
    from dcgh_dist.data.format import list_data_files, read_dataset_info
    from dcgh_dist.storage import resolve_filesystem
    from dcgh_dist.data.prepare.source import path_under

    info = read_dataset_info(uri, s3_endpoint)
    manifest = info.extra.get("manifest")
    if not manifest:
        return [f"{uri}: dataset.json has no manifest (not written by jobs/prepare_data.py?)"]
    fs, root = resolve_filesystem(uri, s3_endpoint)
    problems = []
    listed = set()
    for entry in manifest["shards"]:
        if path_under(uri, entry["path"]) != entry["path"]:  # read only what lies in the dataset
            problems.append(f"{uri}: manifest path {entry['path']!r} is not a file under the dataset root")
            continue
        path = join(root, entry["path"])
        listed.add(path)
        h = hashlib.sha256()
        size = 0
        try:
            with fs.open_input_stream(path) as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
                    size += len(chunk)
        except OSError as e:
            problems.append(f"{uri}/{entry['path']}: cannot read ({e})")
            continue
        if size != entry["bytes"]:
            problems.append(f"{uri}/{entry['path']}: {size} bytes, manifest says {entry['bytes']}")
        if h.hexdigest() != entry["sha256"]:
            problems.append(f"{uri}/{entry['path']}: sha256 {h.hexdigest()} != manifest {entry['sha256']}")
        rows = pq.read_metadata(path, filesystem=fs).num_rows
        if rows != entry["rows"]:
            problems.append(f"{uri}/{entry['path']}: {rows} rows, manifest says {entry['rows']}")
    for path in list_data_files(uri, s3_endpoint):
        if path not in listed:
            problems.append(f"{path}: Parquet file not in the manifest")
    return problems
