"""Binary hash codes: THE bit convention, packing, code-shard Parquet I/O, brute-force Hamming.

Bit convention (used by every part of dcgh-dist: encoding, indexes, search, evaluation):

* **bit = 1 where the relaxed code (the tanh output) is >= 0**, bit = 0 where it is < 0. A ±1
  code maps the same way (+1 -> 1, -1 -> 0). This is :func:`dcgh_dist.metrics.binarize`, so the
  metrics and the indexes always see the same bits.
* **Packing is** ``numpy.packbits(bits, axis=1)``: big-endian within each byte, i.e. hash
  dimension 0 is the most significant bit of byte 0, dimension 7 the least significant bit of
  byte 0, dimension 8 the most significant bit of byte 1, and so on. A K-bit code is K/8 bytes.
* FAISS binary indexes take these bytes as they are: Hamming distance does not depend on the bit
  order inside a byte, as long as queries and database use the same one.

Code shards (what ``jobs/encode.py`` writes and ``jobs/build_index.py`` reads) are Parquet files
with two columns, ``id`` (int64) and ``code`` (``fixed_size_binary(K/8)``); ``binary`` columns of
constant width are accepted too, so shards written by other tools work. Shards written by this
project carry a ``dcgh.codes`` JSON entry in the Parquet schema metadata (bits, bit order, model
fingerprint, modality); see :func:`code_shard_meta`.
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

from dcgh_dist.storage import table_to_bytes

logger = logging.getLogger(__name__)

#: Stated in manifests and shard metadata so a reader can refuse another convention.
BIT_ORDER = "packbits-big-endian; bit=1 where relaxed code >= 0; bit 0 = hash dim 0"
#: Parquet schema-metadata key holding a shard's JSON description.
CODES_META_KEY = b"dcgh.codes"


def to_bits(codes: np.ndarray) -> np.ndarray:
    """(n, K) codes -> (n, K) bool bits, by the convention above.

    bool arrays are bits already; a numeric array whose values are all exactly 0 or 1 is read as
    {0, 1} bits; anything else (±1, relaxed tanh outputs) is ``value >= 0``. Same rules as
    :func:`dcgh_dist.metrics.binarize`, which does the work.
    """
    from dcgh_dist.metrics import binarize

    bits = binarize(codes)
    if bits.ndim != 2:
        raise ValueError(f"codes must be a 2-D (n_items, n_bits) array, got shape {bits.shape}")
    return bits


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """(n, K) bits / ±1 / relaxed codes -> (n, K/8) packed uint8 (big-endian, see module doc)."""
    bits = to_bits(codes)
    if bits.shape[1] % 8:
        raise ValueError(f"codes have {bits.shape[1]} bits; the bit width must be a multiple of 8")
    return np.packbits(bits, axis=1)


def pack_relaxed(relaxed: np.ndarray) -> np.ndarray:
    """Model outputs (tanh, (n, K) float) -> packed codes: exactly ``packbits(relaxed >= 0)``.

    What the encoder uses: unlike :func:`pack_codes` it never reads an all-{0,1} batch as bits.
    """
    relaxed = np.asarray(relaxed)
    if relaxed.ndim != 2 or relaxed.shape[1] % 8:
        raise ValueError(f"relaxed codes must be (n, K) with K a multiple of 8, got {relaxed.shape}")
    if np.issubdtype(relaxed.dtype, np.floating) and np.isnan(relaxed).any():
        raise ValueError("relaxed codes contain NaN")
    return np.packbits(relaxed >= 0, axis=1)


def unpack_codes(packed: np.ndarray, bits: int | None = None) -> np.ndarray:
    """(n, K/8) packed uint8 -> (n, K) bool bits; inverse of :func:`pack_codes`."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise ValueError(f"packed codes must be a 2-D uint8 array, got {packed.dtype} {packed.shape}")
    if bits is not None and bits != packed.shape[1] * 8:
        raise ValueError(f"packed codes are {packed.shape[1] * 8} bits wide, expected {bits}")
    return np.unpackbits(packed, axis=1).astype(bool)


def as_packed(codes: np.ndarray, bits: int) -> np.ndarray:
    """Queries in any accepted form -> C-contiguous (n, bits/8) packed uint8.

    A uint8 array of width ``bits/8`` is taken as packed already; anything else must be (n, bits)
    bits / ±1 / relaxed codes and is packed. A single 1-D code is treated as one row.
    """
    arr = np.asarray(codes)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"query codes must be 2-D, got shape {arr.shape}")
    if arr.dtype == np.uint8 and arr.shape[1] == bits // 8:
        return np.ascontiguousarray(arr)
    if arr.shape[1] != bits:
        raise ValueError(
            f"query codes have width {arr.shape[1]}: expected {bits // 8} packed uint8 bytes or "
            f"{bits} unpacked values (±1, relaxed or bits) for this {bits}-bit index"
        )
    return np.ascontiguousarray(pack_codes(arr))


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming_distances_packed(query_packed: np.ndarray, db_packed: np.ndarray) -> np.ndarray:
    """Brute-force (Q, N) Hamming distances (int32) between packed codes: the reference that
    every index is tested against. Materialises Q x N x K/8 bytes; chunk for large inputs."""
    q = np.asarray(query_packed, dtype=np.uint8)
    d = np.asarray(db_packed, dtype=np.uint8)
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"code widths differ: {q.shape[1]} vs {d.shape[1]} bytes")
    x = np.bitwise_xor(q[:, None, :], d[None, :, :])
    return _POPCOUNT8[x].sum(axis=2, dtype=np.int32)


# --------------------------------------------------------------------------------------------
# Code shards (Parquet)


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
