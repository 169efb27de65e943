"""Code shards: the Parquet files of binary codes that encoding writes and index builds read.

Code shards (what ``jobs/encode.py`` writes and ``jobs/build_index.py`` reads) are Parquet files
with two columns, ``id`` (int64) and ``code`` (``fixed_size_binary(K/8)``); ``binary`` columns of
constant width are accepted too, so shards written by other tools work. Shards written by this
project carry a ``dcgh.codes`` JSON entry in the Parquet schema metadata (bits, bit order, model
fingerprint, modality); see :func:`code_shard_meta`. The bit convention and packing: :mod:`dcgh_dist.codes`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dcgh_dist.codes import BIT_ORDER
from dcgh_dist.storage import table_to_bytes

logger = logging.getLogger(__name__)

#: Parquet schema-metadata key holding a shard's JSON description.
CODES_META_KEY = b"dcgh.codes"


def code_schema(bits: int, meta: dict[str, Any] | None = None, relaxed: bool = False) -> pa.Schema:
    fields = [("id", pa.int64()), ("code", pa.binary(bits // 8))]
    if relaxed:  # the tanh outputs the bits came from, for re-ranking (jobs/encode.py --relaxed)
        fields.append(("relaxed", pa.list_(pa.float16(), bits)))
    schema = pa.schema(fields)
    if meta is not None:
        schema = schema.with_metadata({CODES_META_KEY: json.dumps(meta, sort_keys=True).encode()})
    return schema


def code_shard_meta(
    bits: int, fingerprint: str | None, modality: str | None, **extra: Any
) -> dict[str, Any]:
    """The JSON stored in a code shard's Parquet metadata."""
    return {"bits": bits, "bit_order": BIT_ORDER, "model_fingerprint": fingerprint,
            "modality": modality, **extra}


def codes_table(ids: np.ndarray, packed: np.ndarray, meta: dict[str, Any] | None = None,
                relaxed: np.ndarray | None = None) -> pa.Table:
    """(ids, packed codes[, relaxed (n, K) codes]) -> an Arrow table with the code-shard schema."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    width = packed.shape[1]
    code = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), len(packed), [None, pa.py_buffer(packed.tobytes())]
    )
    columns = [pa.array(np.asarray(ids, dtype=np.int64)), code]
    if relaxed is not None:
        relaxed = np.ascontiguousarray(relaxed, dtype=np.float16)
        if relaxed.shape != (len(packed), width * 8):
            raise ValueError(f"relaxed codes are {relaxed.shape}, expected {(len(packed), width * 8)}")
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(relaxed.ravel(), pa.float16()), width * 8))
    return pa.Table.from_arrays(columns, schema=code_schema(width * 8, meta, relaxed is not None))


# Codes are random bits: compression and dictionaries buy nothing on them; ids compress well.
CODE_SHARD_OPTIONS = {"compression": {"id": "zstd", "code": "none", "relaxed": "none"}, "use_dictionary": False}


def code_shard_bytes(table: pa.Table) -> bytes:
    """A code shard's Parquet bytes, for ``storage.write_bytes_atomic``."""
    return table_to_bytes(table, **CODE_SHARD_OPTIONS)


def codes_from_column(col: pa.ChunkedArray | pa.Array, where: str) -> np.ndarray:
    """A ``code`` column (fixed_size_binary, or binary of constant width) -> (n, width) uint8."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    out = []
    width = None
    for ch in chunks:
        if ch.null_count:
            raise ValueError(f"{where}: column 'code' has {ch.null_count} null value(s)")
        if pa.types.is_fixed_size_binary(ch.type):
            w = ch.type.byte_width
            buf = ch.buffers()[1]
            arr = np.frombuffer(buf, dtype=np.uint8, count=len(ch) * w, offset=ch.offset * w)
            arr = arr.reshape(len(ch), w)
        elif pa.types.is_binary(ch.type) or pa.types.is_large_binary(ch.type):
            lens = np.unique(pc.binary_length(ch).to_numpy(zero_copy_only=False))
            if len(lens) > 1:
                raise ValueError(f"{where}: column 'code' has codes of different lengths {lens.tolist()}")
            w = int(lens[0]) if len(lens) else (width or 0)
            arr = np.frombuffer(b"".join(ch.to_pylist()), dtype=np.uint8).reshape(len(ch), w)
        else:
            raise ValueError(
                f"{where}: column 'code' must be fixed_size_binary(K/8) (or binary), got {ch.type}"
            )
        if width is not None and w != width and len(ch):
            raise ValueError(f"{where}: column 'code' mixes widths {width} and {w}")
        width = w if len(ch) else width
        out.append(arr)
    if not out:
        return np.zeros((0, width or 0), dtype=np.uint8)
    return np.ascontiguousarray(np.concatenate(out) if len(out) > 1 else out[0])


def read_code_meta(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """The ``dcgh.codes`` metadata of a code shard, or None for a shard written elsewhere."""
    schema = pq.read_schema(path, filesystem=fs)
    raw = (schema.metadata or {}).get(CODES_META_KEY)
    return json.loads(raw) if raw else None


def read_code_shard(fs: pafs.FileSystem, path: str, where: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, packed codes uint8 (n, K/8)) of one code shard; errors name the file."""
    where = where or path
    try:
        table = pq.read_table(path, filesystem=fs, columns=["id", "code"])
    except (pa.ArrowInvalid, KeyError) as e:
        raise ValueError(
            f"{where}: not a code shard (needs columns 'id' int64 and 'code' fixed_size_binary): {e}"
        ) from e
    ids_col = table.column("id")
    if not pa.types.is_integer(ids_col.type):
        raise ValueError(f"{where}: column 'id' must be int64, got {ids_col.type}")
    if ids_col.null_count:
        raise ValueError(f"{where}: column 'id' has null values")
    ids = ids_col.to_numpy().astype(np.int64, copy=False)
    return ids, codes_from_column(table.column("code"), where)


def read_relaxed(fs: pafs.FileSystem, path: str, where: str | None = None) -> np.ndarray:
    """The ``relaxed`` column of a code shard as (n, K) float16 (written by ``encode --relaxed``)."""
    where = where or path
    col = pq.read_table(path, filesystem=fs, columns=["relaxed"]).column("relaxed").combine_chunks()
    if not pa.types.is_fixed_size_list(col.type) or col.null_count:
        raise ValueError(f"{where}: column 'relaxed' must be fixed_size_list<float16>[K] without nulls, got {col.type}")
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float16).reshape(len(col), col.type.list_size)


def has_relaxed(fs: pafs.FileSystem, path: str) -> bool:
    return "relaxed" in pq.read_schema(path, filesystem=fs).names
