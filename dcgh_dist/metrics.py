"""Retrieval metrics for binary hash codes: mAP, mAP@k, NDCG@k, precision@k, PR by Hamming radius.

All functions take numpy arrays and return python floats (or numpy arrays for the PR curve).

Conventions shared by every metric (they follow the DCGH authors' evaluation code; see
``tests/data/golden/README.md``):

* **Codes** may be ±1, {0, 1} or real-valued relaxed codes (e.g. tanh outputs); see
  :func:`binarize` for how they become bits.
* **Labels** are ``(n, C)`` multi-hot arrays of any numeric (or bool) dtype; an entry ``> 0``
  means the item carries that class.
* **Relevance**: a database item is relevant to a query when they share at least one label.
  NDCG uses graded relevance instead: the *number* of shared labels.
* **Ranking**: database items are ranked by Hamming distance to the query, ascending, with ties
  broken by database order (a stable sort). Every metric uses this same ranking, so results
  match a naive ``np.argsort(distances, kind="stable")`` loop exactly.
* **Queries without relevant items** score 0 and stay in the denominator of the mean.

Implementation: queries are processed in chunks so that memory stays bounded. For each chunk the
Hamming distances come from one float32 matmul of ±1 codes (exact: the inner products are
integers far below 2**24), are stored as uint8 (uint16 for more than 255 bits) and ranked with
numpy's stable argsort, which is a linear-time radix sort for 8/16-bit integers. Every metric then
reads the same ranking, so :func:`retrieval_metrics` computes the distances and the sort once per
chunk for all metrics.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from dcgh_dist.codes import binarize

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHUNK_PAIRS",
    "TASKS",
    "average_precision",
    "dcg",
    "dcg_discounts",
    "hamming_distances_unpacked",
    "mean_average_precision",
    "ndcg_at_k",
    "precision_at_k",
    "precision_at_n",
    "pr_curve_hamming",
    "plot_pr_curves",
    "retrieval_metrics",
]

#: The retrieval tasks: name -> (query modality, database modality).
TASKS = {"i2t": ("image", "text"), "t2i": ("text", "image"), "i2i": ("image", "image"), "t2t": ("text", "text")}

#: Default number of (query, database item) pairs handled per chunk when ``chunk_size`` is None.
#: A pair costs about 30 bytes of temporaries (float32 inner product, uint8 distance, int64 sort
#: index, float32 label overlap, bool relevance and its sorted copy), so 2**23 pairs keep one
#: chunk's working set near 256 MB whatever the database size.
DEFAULT_CHUNK_PAIRS = 2**23

# float32 represents every integer up to 2**24 exactly; beyond that the matmul-based distance
# and label-overlap counts could round.
_MAX_EXACT_FLOAT32_INT = 2**24


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def _code_bits(codes: np.ndarray, name: str) -> np.ndarray:
    bits = binarize(codes)
    if bits.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n_items, n_bits) array, got shape {bits.shape}")
    if bits.shape[0] == 0 or bits.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {bits.shape})")
    return bits


def _label_matrix(labels: np.ndarray, name: str, n_rows: int, codes_name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if not (
        arr.dtype == np.bool_
        or np.issubdtype(arr.dtype, np.integer)
        or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"{name} must be a real numeric or bool array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n_items, n_classes) array, got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has no classes (shape {arr.shape})")
    if arr.shape[0] != n_rows:
        raise ValueError(
            f"{name} has {arr.shape[0]} rows but {codes_name} has {n_rows}; they must match"
        )
    # 0/1 float32 so that a matmul counts shared labels exactly.
    return (arr > 0).astype(np.float32)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class _Problem:
    """Validated inputs, laid out for the chunked kernels."""

    query_pm: np.ndarray  # (Q, K) float32 ±1
    db_half_t: np.ndarray  # (K, N) float32 ∓0.5 (see _pm_distances), C-contiguous for the matmul
    query_labels: np.ndarray  # (Q, C) float32 0/1
    db_labels_t: np.ndarray  # (C, N) float32 0/1
    dist_dtype: type  # uint8 / uint16 / int32: smallest holding 0..K (radix sort when <=16 bit)

    @property
    def n_query(self) -> int:
        return self.query_pm.shape[0]

    @property
    def n_db(self) -> int:
        return self.db_half_t.shape[1]

    @property
    def n_bits(self) -> int:
        return self.query_pm.shape[1]


def _to_pm(bits: np.ndarray) -> np.ndarray:
    return np.where(bits, np.float32(1.0), np.float32(-1.0))


def _to_db_half_t(bits: np.ndarray) -> np.ndarray:
    """Database bits as the (K, N) matrix -0.5 * (±1 code), the right operand of _pm_distances."""
    return np.ascontiguousarray(np.where(bits, np.float32(-0.5), np.float32(0.5)).T)


def _check_codes(query_codes: np.ndarray, db_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q_bits = _code_bits(query_codes, "query_codes")
    d_bits = _code_bits(db_codes, "db_codes")
    if q_bits.shape[1] != d_bits.shape[1]:
        raise ValueError(
            f"bit widths differ: query_codes has {q_bits.shape[1]} bits, "
            f"db_codes has {d_bits.shape[1]}"
        )
    if q_bits.shape[1] >= _MAX_EXACT_FLOAT32_INT:
        raise ValueError(f"codes with {q_bits.shape[1]} bits are not supported")
    return q_bits, d_bits


def _prepare(
    query_codes: np.ndarray,
    db_codes: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
) -> _Problem:
    q_bits, d_bits = _check_codes(query_codes, db_codes)
    ql = _label_matrix(query_labels, "query_labels", q_bits.shape[0], "query_codes")
    dl = _label_matrix(db_labels, "db_labels", d_bits.shape[0], "db_codes")
    if ql.shape[1] != dl.shape[1]:
        raise ValueError(
            f"class counts differ: query_labels has {ql.shape[1]} classes, "
            f"db_labels has {dl.shape[1]}"
        )
    if ql.shape[1] >= _MAX_EXACT_FLOAT32_INT:
        raise ValueError(f"labels with {ql.shape[1]} classes are not supported")
    n_bits = q_bits.shape[1]
    if n_bits <= np.iinfo(np.uint8).max:
        dist_dtype: type = np.uint8
    elif n_bits <= np.iinfo(np.uint16).max:
        dist_dtype = np.uint16
    else:
        dist_dtype = np.int32
    return _Problem(
        query_pm=_to_pm(q_bits),
        db_half_t=_to_db_half_t(d_bits),
        query_labels=ql,
        db_labels_t=np.ascontiguousarray(dl.T),
        dist_dtype=dist_dtype,
    )


def _resolve_chunk_size(chunk_size: int | None, n_query: int, n_db: int) -> int:
    if chunk_size is None:
        return max(1, min(n_query, DEFAULT_CHUNK_PAIRS // n_db))
    return _positive_int(chunk_size, "chunk_size")


# --------------------------------------------------------------------------------------------
# Chunked kernels
# --------------------------------------------------------------------------------------------


def _pm_distances(query_pm: np.ndarray, db_half_t: np.ndarray, dtype: type) -> np.ndarray:
    """Hamming distances d = (K - <q, b>) / 2 for ±1 codes q, b, exact in float32.

    ``db_half_t`` holds -b / 2, so the matmul gives -<q, b> / 2 directly and one in-place add of
    K / 2 finishes the job: every intermediate is a multiple of 0.5 below 2**23, hence exact.
    """
    dist = query_pm @ db_half_t
    dist += np.float32(query_pm.shape[1] / 2)
    return dist.astype(dtype)


def _iter_chunks(
    problem: _Problem, chunk_size: int
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Yield ``(start, stop, distances, overlap)`` for consecutive blocks of queries.

    ``overlap[i, j]`` is the number of labels query ``start + i`` shares with db item ``j``
    (float32 holding exact integers).
    """
    for start in range(0, problem.n_query, chunk_size):
        stop = min(problem.n_query, start + chunk_size)
        dist = _pm_distances(problem.query_pm[start:stop], problem.db_half_t, problem.dist_dtype)
        overlap = problem.query_labels[start:stop] @ problem.db_labels_t
        yield start, stop, dist, overlap


def average_precision(rel_sorted: np.ndarray) -> np.ndarray:
    """Per-row AP of ranked boolean relevance (rows = queries, columns = ranks 1..n).

    AP = mean over the relevant positions of (relevant items up to and including it) / rank;
    0 for a row without any relevant position. Pass the first k columns for AP@k.
    """
    n_rows, width = rel_sorted.shape
    hits = np.count_nonzero(rel_sorted, axis=1)
    out = np.zeros(n_rows, dtype=np.float64)
    # Work on the relevant positions only. flatnonzero is row-major, so within a row the
    # positions come out ascending: the t-th one found is the t-th relevant item of the ranking.
    flat = np.flatnonzero(rel_sorted)
    if flat.size == 0:
        return out
    row_start = np.cumsum(hits) - hits  # index in `flat` of each row's first relevant position
    hit_number = np.arange(1, flat.size + 1, dtype=np.float64)
    hit_number -= np.repeat(row_start, hits)
    rank = flat - np.repeat(np.arange(n_rows, dtype=np.int64) * width, hits)
    rank += 1
    hit_number /= rank  # now the precision at each relevant position
    nonempty = hits > 0
    out[nonempty] = np.add.reduceat(hit_number, row_start[nonempty]) / hits[nonempty]
    return out


def dcg_discounts(k: int) -> np.ndarray:
    """1 / log2(rank + 1) for rank = 1..k, float64."""
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def dcg(graded_top: np.ndarray, discounts: np.ndarray) -> np.ndarray:
    """Per-row DCG of graded relevance (shared-label counts) in rank order, gain 2**rel - 1."""
    return (np.exp2(graded_top.astype(np.float64)) - 1.0) @ discounts


def _ndcg(overlap_top: np.ndarray, overlap: np.ndarray, k: int) -> np.ndarray:
    """Per-row NDCG@k.

    ``overlap_top`` is the graded relevance of the first k ranked items, ``overlap`` that of the
    whole database (for the ideal DCG). Relevance is a small integer, so sorting it as uint8 /
    uint16 is a linear-time radix sort rather than a comparison sort.
    """
    n_rows = overlap.shape[0]
    disc = dcg_discounts(k)
    found = dcg(overlap_top, disc)
    rel_max = int(overlap.max()) if overlap.size else 0
    if rel_max <= np.iinfo(np.uint8).max:
        rel_dtype: type = np.uint8
    elif rel_max <= np.iinfo(np.uint16).max:
        rel_dtype = np.uint16
    else:
        rel_dtype = np.int32
    ideal = np.sort(overlap.astype(rel_dtype), axis=1, kind="stable")[:, : -k - 1 : -1]
    idcg = dcg(ideal, disc)
    return np.divide(found, idcg, out=np.zeros(n_rows, dtype=np.float64), where=idcg > 0)


def _evaluate(
    problem: _Problem,
    *,
    map_topk: int | None,
    compute_map: bool,
    ndcg_ks: Sequence[int],
    precision_ks: Sequence[int],
    chunk_size: int | None,
) -> dict[str, float]:
    """One pass over query chunks computing every requested metric from the same ranking."""
    n_query, n_db = problem.n_query, problem.n_db
    chunk = _resolve_chunk_size(chunk_size, n_query, n_db)
    # Slice widths, clipped to the database: k > N means "the whole database".
    top_ks = list(ndcg_ks) + list(precision_ks) + ([map_topk] if compute_map and map_topk else [])
    k_top = min(max(top_ks), n_db) if top_ks else 0
    full_map = compute_map and map_topk is None

    per_query: dict[str, np.ndarray] = {}
    if compute_map:
        per_query["map"] = np.empty(n_query, dtype=np.float64)
    for k in ndcg_ks:
        per_query[f"ndcg@{k}"] = np.empty(n_query, dtype=np.float64)
    for k in precision_ks:
        per_query[f"p@{k}"] = np.empty(n_query, dtype=np.float64)
    logger.debug(
        "evaluating %d queries x %d db items, %d bits, chunks of %d queries",
        n_query, n_db, problem.n_bits, chunk,
    )

    for start, stop, dist, overlap in _iter_chunks(problem, chunk):
        # Radix sort for uint8/uint16 keys; 'stable' keeps database order among equal distances.
        order = np.argsort(dist, axis=1, kind="stable")
        relevant = overlap > 0
        if full_map:
            rel_sorted = np.take_along_axis(relevant, order, axis=1)
            per_query["map"][start:stop] = average_precision(rel_sorted)
            rel_top = rel_sorted[:, :k_top]
        elif k_top:
            rel_top = np.take_along_axis(relevant, order[:, :k_top], axis=1)
        if compute_map and map_topk is not None:
            per_query["map"][start:stop] = average_precision(rel_top[:, : min(map_topk, n_db)])
        if precision_ks:  # one cumulative count serves every k (a precision@N curve asks for many)
            hits = np.cumsum(rel_top, axis=1, dtype=np.int64)
            for k in precision_ks:
                k_eff = min(k, n_db)
                per_query[f"p@{k}"][start:stop] = hits[:, k_eff - 1] / k_eff
        if ndcg_ks:
            overlap_top = np.take_along_axis(overlap, order[:, :k_top], axis=1)
            for k in ndcg_ks:
                k_eff = min(k, n_db)
                per_query[f"ndcg@{k}"][start:stop] = _ndcg(overlap_top[:, :k_eff], overlap, k_eff)

    # fsum over the per-query values: the mean does not depend on how queries were chunked.
    return {name: math.fsum(values) / n_query for name, values in per_query.items()}


# --------------------------------------------------------------------------------------------
# Public metrics
# --------------------------------------------------------------------------------------------


def hamming_distances_unpacked(query_codes: np.ndarray, db_codes: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances, int32 array of shape ``(Q, N)``.

    Codes are binarised with :func:`binarize` first, so ±1, {0, 1} and relaxed codes all work.
    The whole ``(Q, N)`` matrix is materialised; the metric functions avoid this by chunking.

    Raises:
        ValueError: if the inputs are not 2-D, are empty or have different bit widths.
    """
    q_bits, d_bits = _check_codes(query_codes, db_codes)
    return _pm_distances(_to_pm(q_bits), _to_db_half_t(d_bits), np.int32)


def mean_average_precision(
    query_codes: np.ndarray,
    db_codes: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    topk: int | None = None,
    *,
    chunk_size: int | None = None,
) -> float:
    """Mean average precision of Hamming ranking (the DCGH authors' ``calc_map_k_matrix``).

    * ``topk=None``: AP over the whole database, i.e. the mean over *all* relevant items of the
      precision at that item's rank.
    * ``topk=k``: standard mAP@k, i.e. the mean over the relevant items found in the first k
      results of the precision at their rank; 0 when none is in the first k. ``k >= N`` equals
      the whole-database value.

    Relevant = shares at least one label; ranking ties are broken by database order; a query
    without any relevant item scores 0 and still counts in the mean.

    Args:
        chunk_size: queries per chunk (None = about :data:`DEFAULT_CHUNK_PAIRS` pairs per chunk).

    Raises:
        ValueError: on mismatched bit widths, class counts or row counts, empty inputs, or a
            non-positive ``topk``.
    """
    problem = _prepare(query_codes, db_codes, query_labels, db_labels)
    topk = None if topk is None else _positive_int(topk, "topk")
    return _evaluate(
        problem, map_topk=topk, compute_map=True, ndcg_ks=(), precision_ks=(),
        chunk_size=chunk_size,
    )["map"]


def ndcg_at_k(
    query_codes: np.ndarray,
    db_codes: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    k: int,
    *,
    chunk_size: int | None = None,
) -> float:
    """Mean NDCG@k of Hamming ranking with graded relevance.

    relevance = number of labels shared with the query; DCG@k = sum over ranks r = 1..k of
    ``(2**rel_r - 1) / log2(r + 1)``; the ideal DCG sorts *all* database items by relevance
    (descending) and takes the first k. Queries whose ideal DCG is 0 (no database item shares a
    label) score 0 and stay in the denominator, as in :func:`mean_average_precision`. Ranking ties
    are broken by database order; ``k > N`` uses the whole database.

    Raises:
        ValueError: on inconsistent or empty inputs, or a non-positive ``k``.
    """
    problem = _prepare(query_codes, db_codes, query_labels, db_labels)
    k = _positive_int(k, "k")
    return _evaluate(
        problem, map_topk=None, compute_map=False, ndcg_ks=(k,), precision_ks=(),
        chunk_size=chunk_size,
    )[f"ndcg@{k}"]


def precision_at_k(
    query_codes: np.ndarray,
    db_codes: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    k: int,
    *,
    chunk_size: int | None = None,
) -> float:
    """Mean precision of the first k Hamming-ranked results (ties broken by database order).

    When ``k`` exceeds the database size N the whole database is retrieved and the count of
    relevant items is divided by ``min(k, N)``, not by k.

    Raises:
        ValueError: on inconsistent or empty inputs, or a non-positive ``k``.
    """
    problem = _prepare(query_codes, db_codes, query_labels, db_labels)
    k = _positive_int(k, "k")
    return _evaluate(
        problem, map_topk=None, compute_map=False, ndcg_ks=(), precision_ks=(k,),
        chunk_size=chunk_size,
    )[f"p@{k}"]


def precision_at_n(
    query_codes: np.ndarray,
    db_codes: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    ns: Sequence[int],
    *,
    chunk_size: int | None = None,
) -> np.ndarray:
    """:func:`precision_at_k` at every N of ``ns`` from one ranking per query: the
    precision@N curve (float64, in the order of ``ns``).

    Raises:
        ValueError: on inconsistent or empty inputs, an empty ``ns`` or a non-positive N.
    """
    problem = _prepare(query_codes, db_codes, query_labels, db_labels)
    ns = [_positive_int(n, "N") for n in ns]
    if not ns:
        raise ValueError("ns must name at least one N")
    res = _evaluate(problem, map_topk=None, compute_map=False, ndcg_ks=(),
                    precision_ks=tuple(dict.fromkeys(ns)), chunk_size=chunk_size)
    return np.array([res[f"p@{n}"] for n in ns], dtype=np.float64)


def retrieval_metrics(
    query_codes: np.ndarray,
    db_codes: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    *,
    map_topk: int | None = None,
    ndcg_k: int | None = 1000,
    precision_k: Sequence[int] = (1, 10, 100, 1000),
    chunk_size: int | None = None,
) -> dict[str, float]:
    """mAP, NDCG@k and precision@k in one pass over query chunks.

    Distances, label overlaps and the stable ranking are computed once per chunk and shared by
    all metrics; each value equals the one from the single-metric function.

    Returns:
        ``{"map": ..., "ndcg@{ndcg_k}": ..., "p@{k}": ... for k in precision_k}`` (python floats;
        the keys use k as given, even when it exceeds the database size), ``"map@{map_topk}"``
        instead of ``"map"`` when ``map_topk`` is set: the same names in every job's output.
        ``ndcg_k=None`` skips NDCG. ``map_topk`` has the meaning of ``topk`` in
        :func:`mean_average_precision`.

    Raises:
        ValueError: on inconsistent or empty inputs, or a non-positive k.
    """
    problem = _prepare(query_codes, db_codes, query_labels, db_labels)
    map_topk = None if map_topk is None else _positive_int(map_topk, "map_topk")
    ndcg_ks = () if ndcg_k is None else (_positive_int(ndcg_k, "ndcg_k"),)
    precision_ks = tuple(dict.fromkeys(_positive_int(k, "precision_k") for k in precision_k))
    out = _evaluate(
        problem, map_topk=map_topk, compute_map=True, ndcg_ks=ndcg_ks,
        precision_ks=precision_ks, chunk_size=chunk_size,
    )
    return {(f"map@{map_topk}" if k == "map" and map_topk else k): v for k, v in out.items()}


def pr_curve_hamming(
    query_codes: np.ndarray,
    db_codes: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    *,
    chunk_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Precision-recall curve of Hamming-ball retrieval, one point per radius.

    For radius r = 0..K the retrieved set is every database item at distance <= r.

    * ``precision[r]``: mean over the queries that retrieve at least one item at radius r of
      (relevant retrieved) / (retrieved); queries retrieving nothing are left out because their
      precision is undefined. NaN when no query retrieves anything at that radius.
    * ``recall[r]``: mean over the queries that have at least one relevant database item of
      (relevant retrieved) / (relevant); non-decreasing in r and 1 at r = K. NaN (all radii)
      when no query has a relevant item.

    Returns:
        ``{"radius": int64 (K+1,), "precision": float64 (K+1,), "recall": float64 (K+1,)}``.
    """
    problem = _prepare(query_codes, db_codes, query_labels, db_labels)
    n_query, n_db, n_bits = problem.n_query, problem.n_db, problem.n_bits
    chunk = _resolve_chunk_size(chunk_size, n_query, n_db)
    levels = n_bits + 1
    precision_sum = np.zeros(levels, dtype=np.float64)
    precision_count = np.zeros(levels, dtype=np.int64)
    recall_sum = np.zeros(levels, dtype=np.float64)
    recall_count = 0
    for start, stop, dist, overlap in _iter_chunks(problem, chunk):
        rows = stop - start
        # Per-query histograms over distance values; cumulative sums give the Hamming-ball counts.
        keys = dist.astype(np.int64) + (np.arange(rows, dtype=np.int64) * levels)[:, None]
        keys = keys.ravel()
        size = rows * levels
        retrieved = np.cumsum(np.bincount(keys, minlength=size).reshape(rows, levels), axis=1)
        relevant = (overlap > 0).ravel()
        hits = np.bincount(keys[relevant], minlength=size).reshape(rows, levels)
        hits = np.cumsum(hits, axis=1)
        has_any = retrieved > 0
        precision_sum += np.divide(
            hits, retrieved, out=np.zeros(hits.shape, dtype=np.float64), where=has_any
        ).sum(axis=0)
        precision_count += has_any.sum(axis=0)
        n_relevant = hits[:, -1]
        with_rel = n_relevant > 0
        recall_sum += (hits[with_rel] / n_relevant[with_rel, None]).sum(axis=0)
        recall_count += int(with_rel.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(precision_count > 0, precision_sum / precision_count, np.nan)
        recall = recall_sum / recall_count if recall_count else np.full(levels, np.nan)
    return {
        "radius": np.arange(levels, dtype=np.int64),
        "precision": precision,
        "recall": recall,
    }


def plot_pr_curves(
    curves: Mapping[str, Mapping[str, np.ndarray]],
    path: str | PathLike[str],
    title: str | None = None,
) -> None:
    """Write one PNG with a precision-recall line per task (e.g. ``"i2t"``, ``"t2i"``).

    Args:
        curves: task name -> a :func:`pr_curve_hamming` result (needs ``precision`` and
            ``recall``). NaN points (radii where precision is undefined) are not drawn.
        path: output file; parent directories are created.
        title: optional figure title.

    Uses the Agg canvas on a bare ``matplotlib.figure.Figure``: no pyplot, so the global backend
    and pyplot's figure registry are left alone.
    """
    # Imported here so that importing this module never touches matplotlib.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, curve in curves.items():
        recall = np.asarray(curve["recall"], dtype=np.float64)
        precision = np.asarray(curve["precision"], dtype=np.float64)
        ok = np.isfinite(recall) & np.isfinite(precision)
        ax.plot(recall[ok], precision[ok], marker=".", linewidth=1.5, label=str(name))
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(loc="best")
    if title:
        ax.set_title(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")


def validation_metrics(codes: Mapping[str, np.ndarray]) -> dict[str, float]:
    """val-vs-val mAP in both directions (``image_codes``, ``text_codes``, ``labels``): what model
    selection and early stopping watch; cheap, and keeps selection off the query split."""
    if len(codes["labels"]) < 2:
        return {}
    i2t = mean_average_precision(codes["image_codes"], codes["text_codes"], codes["labels"], codes["labels"])
    t2i = mean_average_precision(codes["text_codes"], codes["image_codes"], codes["labels"], codes["labels"])
    return {"val_map_i2t": i2t, "val_map_t2i": t2i, "val_map": (i2t + t2i) / 2}
