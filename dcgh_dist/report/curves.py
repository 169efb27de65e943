"""Plain functions on codes and labels for the report's figures (numpy only).

Same conventions as ``dcgh_dist.metrics``: codes are binarised with ``binarize``, an item is
relevant when it shares a label with the query, and the ranking is by Hamming distance with ties
broken by database order (a stable sort). The precision@N curve is ``metrics.precision_at_n``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


# splitmix64 constants: a fixed, well-mixed permutation of int64 ids (no RNG state involved)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def id_hash(ids: np.ndarray) -> np.ndarray:
    """A deterministic pseudo-random uint64 per id (splitmix64 of the id)."""
    with np.errstate(over="ignore"):
        z = np.asarray(ids, dtype=np.int64).astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def sample_ids(ids: np.ndarray, cap: int | None) -> np.ndarray:
    """At most ``cap`` of ``ids``, sorted: the ones with the smallest :func:`id_hash`.

    Deterministic and independent of file order; a larger cap keeps every id a smaller one chose.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if cap is None or len(ids) <= cap:
        return np.sort(ids)
    h = id_hash(ids)
    keep = np.lexsort((ids, h))[:cap]  # ties in the hash (never in practice) broken by id
    return np.sort(ids[keep])


def n_grid(n_db: int, ks: Sequence[int] = (), points: int = 40, n_max: int = 1000) -> np.ndarray:
    """Values of N for a precision@N curve: ``points`` evenly spaced up to ``max(n_max, ks)``
    (clipped to the database), plus every k of ``ks`` that fits, sorted and unique."""
    top = min(n_db, max([n_max, *ks]))
    grid = np.linspace(1, top, points).round().astype(np.int64)
    extra = np.asarray([k for k in ks if 1 <= k <= top], dtype=np.int64)
    return np.unique(np.concatenate([grid, extra, [1, top]]))


