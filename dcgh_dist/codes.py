"""What a hash code is, for every part of dcgh-dist (models, encoding, indexes, search,
evaluation, metrics, training): the bit convention, packing, brute-force Hamming distance, and the key of
one code length's array in a multi-length run. The bottom layer: numpy only.

Bit convention (used by every part of dcgh-dist: encoding, indexes, search, evaluation):

* **bit = 1 where the relaxed code (the tanh output) is >= 0**, bit = 0 where it is < 0. A ±1
  code maps the same way (+1 -> 1, -1 -> 0). This is :func:`binarize`, so the
  metrics and the indexes always see the same bits.
* **Packing is** ``numpy.packbits(bits, axis=1)``: big-endian within each byte, i.e. hash
  dimension 0 is the most significant bit of byte 0, dimension 7 the least significant bit of
  byte 0, dimension 8 the most significant bit of byte 1, and so on. A K-bit code is K/8 bytes.
* FAISS binary indexes take these bytes as they are: Hamming distance does not depend on the bit
  order inside a byte, as long as queries and database use the same one.

Multi-length runs (``model.bits`` a list) name the primary length's arrays plainly
(``image_codes``) and each other length ``K``'s with a suffix (``image_codes@K``):
:func:`length_key`.
"""

from __future__ import annotations

import numpy as np

#: Stated in manifests and shard metadata so a reader can refuse another convention.
BIT_ORDER = "packbits-big-endian; bit=1 where relaxed code >= 0; bit 0 = hash dim 0"


def binarize(codes: np.ndarray) -> np.ndarray:
    """Turn hash codes into bits; returns a bool array of the same shape (True = bit 1).

    * bool arrays are returned as bits unchanged (as a bool array);
    * numeric arrays whose values are all exactly 0 or 1 are taken as {0, 1} bits;
    * anything else (±1 codes, relaxed real-valued codes such as tanh outputs) is binarised by
      sign with zero counting as positive: ``value >= 0`` → bit 1.

    The {0, 1} detection is per array and unambiguous for ±1 codes: the two readings only differ
    on the value 0, which never occurs in a ±1 code. Relaxed codes must therefore be centred on
    zero (tanh-like, not sigmoid-like).

    Raises:
        ValueError: for non-numeric or complex arrays, or codes containing NaN.
    """
    arr = np.asarray(codes)
    if arr.dtype == np.bool_:
        return arr.copy()
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"codes must be a real numeric or bool array, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
        raise ValueError("codes contain NaN")
    if arr.size and arr.min() >= 0 and arr.max() <= 1 and np.all((arr == 0) | (arr == 1)):
        return arr == 1
    return arr >= 0


def length_suffix(bits: int, primary: int) -> str:
    """``""`` for the primary code length, ``"@K"`` for another length ``K``."""
    return "" if bits == primary else f"@{bits}"


def length_key(name: str, bits: int, primary: int) -> str:
    """The key of length ``bits``'s ``name`` array: ``image_codes``, or ``image_codes@16``."""
    return name + length_suffix(bits, primary)


def to_bits(codes: np.ndarray) -> np.ndarray:
    """(n, K) codes -> (n, K) bool bits, by the convention above.

    bool arrays are bits already; a numeric array whose values are all exactly 0 or 1 is read as
    {0, 1} bits; anything else (±1, relaxed tanh outputs) is ``value >= 0``. Same rules as
    :func:`binarize`, which does the work.
    """
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


#: Set bits of each byte value: popcounts of packed codes by table look-up.
POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming_distances_packed(query_packed: np.ndarray, db_packed: np.ndarray) -> np.ndarray:
    """Brute-force (Q, N) Hamming distances (int32) between packed codes: the reference that
    every index is tested against. Materialises Q x N x K/8 bytes; chunk for large inputs."""
    q = np.asarray(query_packed, dtype=np.uint8)
    d = np.asarray(db_packed, dtype=np.uint8)
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"code widths differ: {q.shape[1]} vs {d.shape[1]} bytes")
    x = np.bitwise_xor(q[:, None, :], d[None, :, :])
    return POPCOUNT8[x].sum(axis=2, dtype=np.int32)
