"""Tests for dcgh_dist.metrics: golden parity with the authors' mAP, a brute-force reference, edges."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from plots import line_pixels, read_plot

from dcgh_dist import metrics
from dcgh_dist.codes import binarize
from dcgh_dist.metrics import (
    hamming_distances_unpacked,
    mean_average_precision,
    ndcg_at_k,
    plot_pr_curves,
    pr_curve_hamming,
    precision_at_k,
    retrieval_metrics,
)

# --------------------------------------------------------------------------------------------
# Brute-force reference: explicit loops over queries and ranks, stable argsort per query.
# --------------------------------------------------------------------------------------------


def _naive_bits(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    return codes >= 0


def _naive_rankings(qb, db, ql, dl):
    """Per query: (order, overlap counts in ranked order)."""
    out = []
    for i in range(len(qb)):
        dist = np.array([np.count_nonzero(qb[i] != db[j]) for j in range(len(db))])
        order = np.argsort(dist, kind="stable")
        overlap = np.array([int(np.sum((ql[i] > 0) & (dl[j] > 0))) for j in range(len(dl))])
        out.append((order, overlap))
    return out


def naive_map(qb, db, ql, dl, topk=None):
    total = 0.0
    n = len(db)
    k = n if topk is None else min(topk, n)
    for order, overlap in _naive_rankings(qb, db, ql, dl):
        found, precisions = 0, []
        for rank in range(1, k + 1):
            if overlap[order[rank - 1]] > 0:
                found += 1
                precisions.append(found / rank)
        total += sum(precisions) / len(precisions) if precisions else 0.0
    return total / len(qb)


def naive_ndcg(qb, db, ql, dl, k):
    total = 0.0
    for order, overlap in _naive_rankings(qb, db, ql, dl):
        kk = min(k, len(db))
        dcg = sum((2.0 ** overlap[order[r]] - 1) / math.log2(r + 2) for r in range(kk))
        ideal = sorted(overlap.tolist(), reverse=True)
        idcg = sum((2.0 ** ideal[r] - 1) / math.log2(r + 2) for r in range(kk))
        total += dcg / idcg if idcg > 0 else 0.0
    return total / len(qb)


def naive_precision(qb, db, ql, dl, k):
    total = 0.0
    for order, overlap in _naive_rankings(qb, db, ql, dl):
        kk = min(k, len(db))
        total += sum(1 for r in range(kk) if overlap[order[r]] > 0) / kk
    return total / len(qb)


def naive_pr(qb, db, ql, dl):
    n_bits = qb.shape[1]
    precision, recall = [], []
    for radius in range(n_bits + 1):
        p_vals, r_vals = [], []
        for i in range(len(qb)):
            dist = np.count_nonzero(qb[i] != db, axis=1)
            rel = ((ql[i] > 0) & (dl > 0)).any(axis=1)
            got = dist <= radius
            if got.sum():
                p_vals.append((got & rel).sum() / got.sum())
            if rel.sum():
                r_vals.append((got & rel).sum() / rel.sum())
        precision.append(np.mean(p_vals) if p_vals else np.nan)
        recall.append(np.mean(r_vals) if r_vals else np.nan)
    return np.array(precision), np.array(recall)


def random_problem(seed, n_query=30, n_db=250, n_bits=8, n_classes=6, label_p=0.3):
    """Few bits so that distances tie a lot; some rows have no label at all."""
    rng = np.random.default_rng(seed)
    qb = rng.random((n_query, n_bits)) < 0.5
    db = rng.random((n_db, n_bits)) < 0.5
    ql = (rng.random((n_query, n_classes)) < label_p).astype(np.float32)
    dl = (rng.random((n_db, n_classes)) < label_p).astype(np.float32)
    ql[0] = 0  # a query with no label: no relevant item
    return qb, db, ql, dl


def pm(bits):
    return np.where(bits, 1, -1).astype(np.int8)


@pytest.fixture(scope="module")
def problem():
    return random_problem(0)


# --------------------------------------------------------------------------------------------
# Golden parity with the authors' calc_map_k_matrix
# --------------------------------------------------------------------------------------------


def _golden_case(golden_dir: Path, i: int):
    data = np.load(golden_dir / "map_cases.npz")
    args = [data[f"case{i}_{n}"] for n in ("query_codes", "db_codes", "query_labels", "db_labels")]
    topk = int(data[f"case{i}_topk"])
    return args, (None if topk < 0 else topk), float(data[f"case{i}_map"])


def _relaxed(codes_pm, rng):
    """Real-valued codes with the same signs; some exact zeros where the bit is +1."""
    mag = rng.uniform(0.01, 1.0, size=codes_pm.shape)
    out = np.where(codes_pm > 0, mag, -mag)
    out[(codes_pm > 0) & (rng.random(codes_pm.shape) < 0.1)] = 0.0
    return out.astype(np.float32)


@pytest.mark.parametrize("form", ["pm1", "zero_one", "relaxed"])
@pytest.mark.parametrize("case", [0, 1, 2])
def test_golden_map(golden_dir, case, form):
    (q, d, ql, dl), topk, expected = _golden_case(golden_dir, case)
    if form == "zero_one":
        q, d = (q > 0).astype(np.uint8), (d > 0).astype(np.float64)
    elif form == "relaxed":
        rng = np.random.default_rng(case)
        q, d = _relaxed(q, rng), _relaxed(d, rng)
    got = mean_average_precision(q, d, ql, dl, topk=topk)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, abs=1e-6)
    key = "map" if topk is None else f"map@{topk}"  # retrieval_metrics names mAP@k map@k
    assert retrieval_metrics(q, d, ql, dl, map_topk=topk)[key] == got


# One golden test of each kind; each must report an error when its reference data is missing.
_GOLDEN_TESTS = (
    "tests/test_metrics.py::test_golden_map[0-pm1]",
    "tests/test_metrics.py::test_pr_curve_nan_precision_only_where_nothing_retrieved",
    "tests/test_losses.py::test_single_label_batch_has_zero_negative_pair_term",
)


def test_missing_golden_data_is_an_error_not_a_skip(tmp_path):
    import xml.etree.ElementTree as ET

    empty = tmp_path / "golden"
    empty.mkdir()
    report = tmp_path / "report.xml"
    env = {**os.environ, "DCGH_GOLDEN_DIR": str(empty), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
         *_GOLDEN_TESTS],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # 1: tests failed (5 = none collected)
    cases = ET.parse(report).getroot().iter("testcase")
    outcomes = {c.get("name"): [child.tag for child in c] for c in cases}
    assert len(outcomes) == len(_GOLDEN_TESTS), outcomes
    for name, tags in outcomes.items():
        assert "error" in tags and "skipped" not in tags, (name, tags)
    assert "skipped" not in proc.stdout
    assert f"missing in {empty}" in proc.stdout


# --------------------------------------------------------------------------------------------
# Fast vs brute force (many ties: 8-bit codes)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topk", [None, 1, 5, 37, 250, 1000])
def test_map_matches_naive(problem, topk):
    qb, db, ql, dl = problem
    assert mean_average_precision(pm(qb), pm(db), ql, dl, topk=topk) == pytest.approx(
        naive_map(qb, db, ql, dl, topk), abs=1e-12
    )


@pytest.mark.parametrize("k", [1, 10, 100, 250, 400])
def test_ndcg_matches_naive(problem, k):
    qb, db, ql, dl = problem
    assert ndcg_at_k(pm(qb), pm(db), ql, dl, k) == pytest.approx(
        naive_ndcg(qb, db, ql, dl, k), abs=1e-12
    )


@pytest.mark.parametrize("k", [1, 7, 100, 250, 400])
def test_precision_matches_naive(problem, k):
    qb, db, ql, dl = problem
    assert precision_at_k(pm(qb), pm(db), ql, dl, k) == pytest.approx(
        naive_precision(qb, db, ql, dl, k), abs=1e-12
    )


def test_retrieval_metrics_matches_single_metric_functions():
    qb, db, ql, dl = random_problem(1, n_query=40, n_db=300, n_bits=12, n_classes=8, label_p=0.4)
    q, d = pm(qb), pm(db)
    for map_topk in (None, 20):
        res = retrieval_metrics(q, d, ql, dl, map_topk=map_topk, ndcg_k=50, precision_k=(1, 10, 500))
        key = "map" if map_topk is None else f"map@{map_topk}"
        assert set(res) == {key, "ndcg@50", "p@1", "p@10", "p@500"}
        assert all(isinstance(v, float) for v in res.values())
        assert res[key] == pytest.approx(mean_average_precision(q, d, ql, dl, map_topk), abs=1e-12)
        assert res["ndcg@50"] == pytest.approx(ndcg_at_k(q, d, ql, dl, 50), abs=1e-12)
        for k in (1, 10, 500):
            assert res[f"p@{k}"] == pytest.approx(precision_at_k(q, d, ql, dl, k), abs=1e-12)
    assert res["ndcg@50"] == pytest.approx(naive_ndcg(qb, db, ql, dl, 50), abs=1e-12)
    assert "ndcg@50" not in retrieval_metrics(q, d, ql, dl, ndcg_k=None)


def test_graded_relevance_ndcg_matches_naive():
    # Many labels per item so that relevance takes several levels.
    qb, db, ql, dl = random_problem(2, n_query=25, n_db=200, n_bits=6, n_classes=10, label_p=0.6)
    for k in (3, 40, 200):
        assert ndcg_at_k(qb, db, ql, dl, k) == pytest.approx(naive_ndcg(qb, db, ql, dl, k), abs=1e-12)
    # Dense labels over many classes: many relevance levels (large gains 2**rel - 1).
    qb, db, ql, dl = random_problem(4, n_query=12, n_db=120, n_bits=6, n_classes=24, label_p=0.8)
    assert (ql @ dl.T).max() > 12
    for k in (5, 60):
        assert ndcg_at_k(qb, db, ql, dl, k) == pytest.approx(naive_ndcg(qb, db, ql, dl, k), abs=1e-12)
    # More than 255 shared labels: relevance no longer fits in uint8.
    qb, db, ql, dl = random_problem(5, n_query=3, n_db=20, n_bits=4, n_classes=300, label_p=0.95)
    assert (ql @ dl.T).max() > 255
    assert ndcg_at_k(qb, db, ql, dl, 7) == pytest.approx(naive_ndcg(qb, db, ql, dl, 7), abs=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_chunk_size_does_not_change_results(problem, chunk_size):
    qb, db, ql, dl = problem
    q, d = pm(qb), pm(db)
    kwargs = dict(ndcg_k=20, precision_k=(1, 10, 100))
    ref = retrieval_metrics(q, d, ql, dl, **kwargs)
    got = retrieval_metrics(q, d, ql, dl, chunk_size=chunk_size, **kwargs)
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12)
    ref_pr = pr_curve_hamming(q, d, ql, dl)
    got_pr = pr_curve_hamming(q, d, ql, dl, chunk_size=chunk_size)
    np.testing.assert_allclose(got_pr["precision"], ref_pr["precision"], atol=1e-12)
    np.testing.assert_allclose(got_pr["recall"], ref_pr["recall"], atol=1e-12)


# --------------------------------------------------------------------------------------------
# Codes and distances
# --------------------------------------------------------------------------------------------


def test_binarize_forms():
    expected = np.array([[True, False, True, True]])
    assert binarize(np.array([[1, -1, 1, 1]], dtype=np.int8)).tolist() == expected.tolist()
    assert binarize(np.array([[1, 0, 1, 1]], dtype=np.uint8)).tolist() == expected.tolist()
    assert binarize(np.array([[0.3, -0.2, 0.0, 0.9]])).tolist() == expected.tolist()
    assert binarize(expected).tolist() == expected.tolist()
    # sign() output with zeros: 0 counts as +1 (the -1 shows it is not a {0,1} code)
    assert binarize(np.array([[1.0, -1.0, 0.0, 0.0]])).tolist() == [[True, False, True, True]]
    assert binarize(np.array([[1.0, 0.0, 1.0]])).dtype == np.bool_
    with pytest.raises(ValueError, match="NaN"):
        binarize(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError):
        binarize(np.array([["a", "b"]]))


def test_hamming_distance_matches_naive():
    rng = np.random.default_rng(3)
    qb, db = rng.random((7, 33)) < 0.5, rng.random((11, 33)) < 0.5
    dist = hamming_distances_unpacked(pm(qb), db.astype(np.uint8))  # mixed ±1 / {0,1} forms
    assert dist.dtype == np.int32 and dist.shape == (7, 11)
    naive = np.array([[np.count_nonzero(a != b) for b in db] for a in qb])
    np.testing.assert_array_equal(dist, naive)
    # 300 bits: more than uint8 can hold internally
    qb, db = rng.random((3, 300)) < 0.5, rng.random((5, 300)) < 0.5
    naive = np.array([[np.count_nonzero(a != b) for b in db] for a in qb])
    np.testing.assert_array_equal(hamming_distances_unpacked(qb, db), naive)
    ql = np.ones((3, 2))
    dl = np.ones((5, 2))
    assert mean_average_precision(qb, db, ql, dl) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------


def test_query_without_relevant_item_counts_zero_and_stays_in_denominator():
    db = pm(np.array([[1, 0], [0, 1], [1, 1]], dtype=bool))
    dl = np.array([[1, 0], [1, 0], [0, 0]], dtype=np.float32)
    q = pm(np.array([[1, 0], [1, 0]], dtype=bool))
    ql = np.array([[1, 0], [0, 1]], dtype=np.float32)  # second query: class 1 is in no db item
    # query 0: distances 0, 2, 1 -> order 0, 2, 1; relevant at ranks 1 and 3 -> AP = (1 + 2/3)/2
    ap0 = (1 + 2 / 3) / 2
    assert mean_average_precision(q, db, ql, dl) == pytest.approx(ap0 / 2, abs=1e-15)
    assert mean_average_precision(q[:1], db, ql[:1], dl) == pytest.approx(ap0, abs=1e-15)
    assert mean_average_precision(q[1:], db, ql[1:], dl) == 0.0
    assert ndcg_at_k(q[1:], db, ql[1:], dl, 2) == 0.0
    assert precision_at_k(q[1:], db, ql[1:], dl, 2) == 0.0
    res = retrieval_metrics(q, db, ql, dl, ndcg_k=3, precision_k=(1,))
    assert res["p@1"] == pytest.approx(0.5)


def test_all_distances_tied_ranks_in_database_order():
    n = 6
    db = np.ones((n, 4), dtype=np.int8)
    q = np.ones((1, 4), dtype=np.int8)
    rel = np.array([0, 1, 0, 1, 1, 0], dtype=np.float32)
    dl = np.stack([rel, 1 - rel], axis=1)
    ql = np.array([[1, 0]], dtype=np.float32)
    # ranks 2, 4, 5 are relevant
    assert mean_average_precision(q, db, ql, dl) == pytest.approx((1 / 2 + 2 / 4 + 3 / 5) / 3)
    assert mean_average_precision(q, db, ql, dl, topk=3) == pytest.approx(1 / 2)
    assert precision_at_k(q, db, ql, dl, 1) == 0.0
    assert precision_at_k(q, db, ql, dl, 2) == pytest.approx(0.5)
    dcg = 1 / math.log2(3)
    idcg = 1 + 1 / math.log2(3)
    assert ndcg_at_k(q, db, ql, dl, 2) == pytest.approx(dcg / idcg)


def test_k_larger_than_database(problem):
    qb, db, ql, dl = problem
    n = len(db)
    rel_frac = np.mean([((ql[i] > 0) & (dl > 0)).any(axis=1).mean() for i in range(len(ql))])
    assert precision_at_k(qb, db, ql, dl, n + 100) == pytest.approx(rel_frac, abs=1e-12)
    assert mean_average_precision(qb, db, ql, dl, topk=10 * n) == pytest.approx(
        mean_average_precision(qb, db, ql, dl), abs=1e-15
    )
    assert ndcg_at_k(qb, db, ql, dl, n + 1) == pytest.approx(ndcg_at_k(qb, db, ql, dl, n), abs=1e-15)
    assert "p@100000" in retrieval_metrics(qb, db, ql, dl, precision_k=(100000,))


def test_single_query(problem):
    qb, db, ql, dl = problem
    q, lab = qb[3:4], ql[3:4]
    assert mean_average_precision(q, db, lab, dl) == pytest.approx(
        naive_map(q, db, lab, dl), abs=1e-12
    )
    assert ndcg_at_k(q, db, lab, dl, 15) == pytest.approx(naive_ndcg(q, db, lab, dl, 15), abs=1e-12)


def test_integer_and_bool_labels(problem):
    qb, db, ql, dl = problem
    ref = mean_average_precision(qb, db, ql, dl)
    assert mean_average_precision(qb, db, ql.astype(bool), dl.astype(np.int64)) == ref


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: {**a, "q": a["q"][:, :5]}, "bit widths"),
        (lambda a: {**a, "ql": a["ql"][:, :3]}, "class counts"),
        (lambda a: {**a, "ql": a["ql"][:4]}, "rows"),
        (lambda a: {**a, "dl": a["dl"][:10]}, "rows"),
        (lambda a: {**a, "q": a["q"][:0], "ql": a["ql"][:0]}, "empty"),
        (lambda a: {**a, "d": a["d"][:0], "dl": a["dl"][:0]}, "empty"),
        (lambda a: {**a, "q": a["q"][0]}, "2-D"),
        (lambda a: {**a, "ql": a["ql"][:, :0], "dl": a["dl"][:, :0]}, "no classes"),
    ],
)
def test_invalid_inputs_raise(problem, mutate, match):
    qb, db, ql, dl = problem
    a = mutate({"q": pm(qb), "d": pm(db), "ql": ql, "dl": dl})
    for fn in (
        lambda: mean_average_precision(a["q"], a["d"], a["ql"], a["dl"]),
        lambda: ndcg_at_k(a["q"], a["d"], a["ql"], a["dl"], 5),
        lambda: precision_at_k(a["q"], a["d"], a["ql"], a["dl"], 5),
        lambda: retrieval_metrics(a["q"], a["d"], a["ql"], a["dl"]),
        lambda: pr_curve_hamming(a["q"], a["d"], a["ql"], a["dl"]),
    ):
        with pytest.raises(ValueError, match=match):
            fn()


def test_invalid_k_raises(problem):
    qb, db, ql, dl = problem
    with pytest.raises(ValueError, match="topk"):
        mean_average_precision(qb, db, ql, dl, topk=0)
    with pytest.raises(ValueError, match="k"):
        ndcg_at_k(qb, db, ql, dl, 0)
    with pytest.raises(ValueError, match="k"):
        precision_at_k(qb, db, ql, dl, -3)
    with pytest.raises(ValueError, match="precision_k"):
        retrieval_metrics(qb, db, ql, dl, precision_k=(1, 2.5))
    with pytest.raises(ValueError, match="chunk_size"):
        mean_average_precision(qb, db, ql, dl, chunk_size=0)
    with pytest.raises(ValueError, match="bit widths"):
        hamming_distances_unpacked(qb, db[:, :3])


# --------------------------------------------------------------------------------------------
# PR curve and plot
# --------------------------------------------------------------------------------------------


def test_pr_curve_matches_naive_and_is_well_formed(problem):
    qb, db, ql, dl = problem
    curve = pr_curve_hamming(pm(qb), pm(db), ql, dl)
    n_bits = qb.shape[1]
    np.testing.assert_array_equal(curve["radius"], np.arange(n_bits + 1))
    precision, recall = curve["precision"], curve["recall"]
    assert precision.shape == recall.shape == (n_bits + 1,)
    naive_p, naive_r = naive_pr(qb, db, ql, dl)
    np.testing.assert_allclose(precision, naive_p, atol=1e-12)
    np.testing.assert_allclose(recall, naive_r, atol=1e-12)
    assert np.all(np.isfinite(recall))
    assert np.all(np.diff(recall) >= -1e-15)
    assert recall[-1] == pytest.approx(1.0)
    finite = precision[np.isfinite(precision)]
    assert finite.size and np.all((finite >= 0) & (finite <= 1))
    assert np.all((recall >= 0) & (recall <= 1))


def test_pr_curve_nan_precision_only_where_nothing_retrieved(golden_dir):
    (q, d, ql, dl), _, _ = _golden_case(golden_dir, 1)  # 64 bits: small radii retrieve nothing
    curve = pr_curve_hamming(q, d, ql, dl)
    undefined = np.isnan(curve["precision"])
    assert undefined[0] and not undefined[-1]
    assert np.all(curve["recall"][undefined] == 0)


def _is_flat(line: np.ndarray) -> bool:
    """Most pixels (all but the legend's sample) on one horizontal line."""
    return np.mean(np.abs(line[:, 1] - np.median(line[:, 1])) < 0.02) > 0.8


_RECALL = np.linspace(0.05, 0.95, 9)
# Known shapes: two horizontal lines and a falling diagonal, which has one point undefined.
_SHAPES = {
    "high": {"recall": _RECALL, "precision": np.full(9, 0.9)},
    "low": {"recall": _RECALL, "precision": np.full(9, 0.2)},
    "diagonal": {"recall": _RECALL, "precision": np.where(np.arange(9) == 4, np.nan, 1 - _RECALL)},
}


def test_plot_pr_curves_draws_every_curve_where_it_belongs(tmp_path):
    out = tmp_path / "sub" / "pr.png"  # parent directories are created
    plot_pr_curves(_SHAPES, out, title="PR")
    lines = line_pixels(read_plot(out))
    assert len(lines) >= len(_SHAPES)
    lines = lines[: len(_SHAPES)]
    # Each curve is drawn across the axes (recall 0.05 -> 0.95), not just as a legend sample.
    assert all(np.ptp(line[:, 0]) > 0.5 for line in lines), [np.ptp(line[:, 0]) for line in lines]
    # Top to bottom: a horizontal line, the diagonal, a horizontal line. Precision falls as
    # recall grows, so the diagonal goes down to the right (y grows with x in image rows).
    top, middle, bottom = sorted(lines, key=lambda line: np.median(line[:, 1]))
    assert _is_flat(top) and _is_flat(bottom) and not _is_flat(middle)
    assert np.corrcoef(middle[:, 0], middle[:, 1])[0, 1] > 0.9
    # Precision is the y axis, upwards: 0.9 is drawn above 0.2.
    rows = {}
    for name in ("high", "low"):
        plot_pr_curves({name: _SHAPES[name]}, tmp_path / f"{name}.png")
        rgb = read_plot(tmp_path / f"{name}.png")
        (line,) = line_pixels(rgb)
        assert _is_flat(line)
        rows[name] = np.median(line[:, 1])
    assert rows["low"] - rows["high"] > 0.3
    assert abs(rows["high"] - np.median(top[:, 1])) < 0.02
    assert abs(rows["low"] - np.median(bottom[:, 1])) < 0.02


def test_plot_pr_curves_of_real_curves(problem, tmp_path):
    qb, db, ql, dl = problem
    curves = {
        "i2t": pr_curve_hamming(qb, db, ql, dl),
        "t2i": pr_curve_hamming(db[:30], qb, dl[:30], ql),
    }
    plot_pr_curves(curves, tmp_path / "pr.png", title="PR")
    both = read_plot(tmp_path / "pr.png")
    lines = line_pixels(both)
    assert len(lines) >= 2 and all(np.ptp(line[:, 0]) > 0.3 for line in lines[:2])
    # Another input gives another picture.
    plot_pr_curves({"i2t": curves["i2t"]}, tmp_path / "one.png", title="PR")
    one = read_plot(tmp_path / "one.png")
    assert len(line_pixels(one)) == 1
    assert np.abs(one.astype(int) - both).sum(axis=2).astype(bool).mean() > 0.005
    # An empty mapping still writes a figure: axes, no lines.
    plot_pr_curves({}, tmp_path / "empty.png")
    assert line_pixels(read_plot(tmp_path / "empty.png")) == []


def test_write_pr_plot_adds_the_baseline_curves(tmp_path):
    from dcgh_dist.evaluation import write_pr_plot

    trained = {"i2t": _SHAPES["high"]}
    write_pr_plot(trained, {"untrained": None}, str(tmp_path / "alone.png"), title="PR")
    write_pr_plot(trained, {"untrained": {"i2t": _SHAPES["low"]}}, str(tmp_path / "with.png"), title="PR")
    assert len(line_pixels(read_plot(tmp_path / "alone.png"))) == 1
    lines = line_pixels(read_plot(tmp_path / "with.png"))
    assert len(lines) == 2
    # Both drawn across the axes (not only as legend samples), as horizontal lines.
    assert all(np.ptp(line[:, 0]) > 0.5 and _is_flat(line) for line in lines)


def test_no_import_side_effects_and_no_pyplot(tmp_path):
    code = (
        "import sys\n"
        "import numpy as np\n"
        "import dcgh_dist.metrics as m\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported at import time'\n"
        "c = {'a': {'precision': np.array([1.0, 0.5]), 'recall': np.array([0.2, 1.0])}}\n"
        f"m.plot_pr_curves(c, {str(tmp_path / 'x.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    repo = Path(metrics.__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo, timeout=60)
    assert len(line_pixels(read_plot(tmp_path / "x.png"))) == 1
