"""Ranking metrics over a sharded index: mAP@k, NDCG@k and precision@k without a Q x N matrix.

:mod:`dcgh_dist.metrics` ranks the whole database for every query (chunked, but still Q x N
distances); here each query retrieves only its top k from a :class:`ShardedIndex`, and
labels are looked up for those k ids. Memory is O(N x classes/8) for the database labels plus
O(batch x k), so it works at database sizes where whole-database mAP would not fit.

Same numbers as :mod:`dcgh_dist.metrics` (tested): there, ties in Hamming distance are broken by
database order, and :func:`dcgh_dist.evaluation.encode_splits` puts the database in id order; here
:meth:`ShardedIndex.search_stable` ranks by (distance, id), seeing every item tied at the k-th
distance before it cuts. NDCG's ideal DCG needs, per query, how many database items share 1, 2, ...
labels with it: computed from the database's distinct label sets and their counts (few, next to N),
never from the N items one by one.

Definitions (as in :mod:`dcgh_dist.metrics`): relevant = shares a label; AP@k = mean, over the
relevant items among the first k, of the precision at their rank (0 if none); P@k = relevant among
the first min(k, N) / min(k, N); NDCG@k with gain 2**shared - 1 and ideal DCG over the whole
database. The AP and DCG kernels are :mod:`dcgh_dist.metrics`' own.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np

from dcgh_dist.data.format import DATABASE_SPLITS, SPLITS
from dcgh_dist.data.labels import LabelTable
from dcgh_dist.codes import POPCOUNT8
from dcgh_dist.metrics import average_precision, dcg, dcg_discounts

logger = logging.getLogger(__name__)


def _overlap(q_packed_labels: np.ndarray, db_packed_labels: np.ndarray) -> np.ndarray:
    """Shared-label counts: (n, Cb) x (n, k, Cb) -> (n, k), or (n, Cb) x (U, Cb) -> (n, U)."""
    if db_packed_labels.ndim == 3:
        x = np.bitwise_and(q_packed_labels[:, None, :], db_packed_labels)
    else:
        x = np.bitwise_and(q_packed_labels[:, None, :], db_packed_labels[None, :, :])
    return POPCOUNT8[x].sum(axis=-1, dtype=np.int32)


def index_retrieval_metrics(
    index,
    query_codes: np.ndarray,
    query_ids: np.ndarray,
    labels: LabelTable,
    *,
    map_topk: int = 1000,
    ndcg_k: int | None = 1000,
    precision_k: Sequence[int] = (1, 10, 100, 1000),
    db_splits: Sequence[str] | None = DATABASE_SPLITS,
    batch_size: int = 1024,
) -> dict[str, float]:
    """mAP@map_topk, NDCG@ndcg_k and P@k of ``query_codes`` against ``index``.

    Keys as :func:`dcgh_dist.metrics.retrieval_metrics` with ``map_topk`` set: ``"map@K"``,
    ``"ndcg@K"``, ``"p@K"``. ``db_splits``: every id in the index must belong to one of them
    (an index built from query rows would score queries against themselves).
    """
    n_db = index.ntotal
    ks = [map_topk] + ([ndcg_k] if ndcg_k else []) + list(precision_k)
    if min(ks) < 1:
        raise ValueError(f"every k must be >= 1, got {ks}")
    k_top = min(max(ks), n_db)
    q_pos = labels.positions(query_ids, "query id")
    q_lab = labels.packed[q_pos]

    # The database's distinct label sets with their counts, for the ideal DCG.
    db_pos = _index_positions(index, labels)
    patterns, pattern_counts = np.unique(labels.packed[db_pos], axis=0, return_counts=True)

    per = {f"map@{map_topk}": [], **({f"ndcg@{ndcg_k}": []} if ndcg_k else {}),
           **{f"p@{k}": [] for k in dict.fromkeys(precision_k)}}
    disc = dcg_discounts(k_top)
    for start in range(0, len(query_codes), batch_size):
        qc = query_codes[start:start + batch_size]
        ql = q_lab[start:start + batch_size]
        _, I = index.search_stable(qc, k_top)
        I = I[:, :k_top]
        if (I < 0).any():
            raise RuntimeError("the index returned fewer results than it holds items")
        pos = labels.positions(I, "index id")
        if db_splits is not None:
            allowed = np.isin(labels.split[pos], [SPLITS.index(s) for s in db_splits])
            if not allowed.all():
                bad = int(I[~allowed][0])
                raise ValueError(f"index id {bad} is in split {SPLITS[labels.split[pos[~allowed][0]]]!r},"
                                 f" not in the database splits {list(db_splits)}; build the index from "
                                 "codes of the database splits (encode --splits train,val,db)")
        overlap = _overlap(ql, labels.packed[pos])
        rel = overlap > 0
        k = min(map_topk, n_db)
        per[f"map@{map_topk}"].append(average_precision(rel[:, :k]))
        for kp in dict.fromkeys(precision_k):
            ke = min(kp, n_db)
            per[f"p@{kp}"].append(np.count_nonzero(rel[:, :ke], axis=1) / ke)
        if ndcg_k:
            ke = min(ndcg_k, n_db)
            found = dcg(overlap[:, :ke], disc[:ke])
            idcg = _ideal_dcg(ql, patterns, pattern_counts, disc[:ke])
            per[f"ndcg@{ndcg_k}"].append(np.divide(found, idcg, out=np.zeros_like(found), where=idcg > 0))
    n_q = len(query_codes)
    return {name: math.fsum(np.concatenate(v)) / n_q for name, v in per.items()}


def _index_positions(index, labels: LabelTable) -> np.ndarray:
    """Label-table positions of every id in the index."""
    return labels.positions(np.concatenate([index.ids(i) for i in range(len(index.manifest.shards))]), "index id")


def _ideal_dcg(q_lab: np.ndarray, patterns: np.ndarray, counts: np.ndarray, disc: np.ndarray) -> np.ndarray:
    """IDCG@k from G_v = #database items sharing >= v labels: the ideal list puts them first,
    and 2**rel - 1 = sum_{v=1..rel} 2**(v-1)."""
    ov = _overlap(q_lab, patterns)  # (n, U)
    v_max = int(ov.max()) if ov.size else 0
    disc_cum = np.concatenate(([0.0], np.cumsum(disc)))
    k = len(disc)
    idcg = np.zeros(len(q_lab))
    for v in range(1, v_max + 1):
        g = (ov >= v).astype(np.int64) @ counts
        idcg += 2.0 ** (v - 1) * disc_cum[np.minimum(g, k)]
    return idcg
