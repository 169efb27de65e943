"""Plain functions on codes and labels for the report's figures (numpy only).

Same conventions as ``dcgh_dist.metrics``: codes are binarised with ``binarize``, an item is
relevant when it shares a label with the query, and the ranking is by Hamming distance with ties
broken by database order (a stable sort), so :func:`precision_at_n` at N = k equals
``metrics.precision_at_k`` with k.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from dcgh_dist.metrics import DEFAULT_CHUNK_PAIRS, hamming_distances_unpacked

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


def precision_at_n(
    query_codes: np.ndarray,
    db_codes: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    ns: Sequence[int],
    *,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Mean precision of the first N Hamming-ranked results, for each N of ``ns`` (float64).

    One ranking per query serves every N. N above the database size N_db counts the relevant
    items of the whole database over ``min(N, N_db)``, as ``metrics.precision_at_k`` does.
    """
    ns = np.asarray(list(ns), dtype=np.int64)
    if ns.size == 0 or ns.min() < 1:
        raise ValueError(f"ns must be positive integers, got {ns.tolist()}")
    q_lab = (np.asarray(query_labels) > 0).astype(np.float32)
    d_lab_t = np.ascontiguousarray((np.asarray(db_labels) > 0).astype(np.float32).T)
    n_query, n_db = len(q_lab), d_lab_t.shape[1]
    if len(query_codes) != n_query or len(db_codes) != n_db:
        raise ValueError("codes and labels must have the same number of rows")
    eff = np.minimum(ns, n_db)
    width = int(eff.max())
    chunk = chunk_size or max(1, min(n_query, DEFAULT_CHUNK_PAIRS // max(n_db, 1)))
    per_query = np.empty((n_query, len(ns)), dtype=np.float64)
    for start in range(0, n_query, chunk):
        stop = min(n_query, start + chunk)
        dist = hamming_distances_unpacked(query_codes[start:stop], db_codes)
        order = np.argsort(dist, axis=1, kind="stable")[:, :width]
        relevant = (q_lab[start:stop] @ d_lab_t) > 0
        hits = np.cumsum(np.take_along_axis(relevant, order, axis=1), axis=1)
        per_query[start:stop] = hits[:, eff - 1] / eff
    # fsum per N: the mean does not depend on the chunking
    return np.array([math.fsum(per_query[:, j]) / n_query for j in range(len(ns))])
