"""A live index: append, delete, compact and filtered search, against brute force over the live
(and filtered) set, on every index type; versions a reader can hold; the job's commands.

Codes with many ties (60 distinct values), so rankings are checked tie-aware: ``search_stable``
ranks by (distance, id), which is what ``brute_force_search`` does over the ids it is given.
IVF indexes are checked exactly with ``nprobe = nlist`` (every list probed) and, at a low nprobe,
for what holds whatever is probed: no deleted or filtered-out id, k results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcgh_dist.data.format import DatasetInfo, write_dataset
from dcgh_dist.index import IndexConfig, ManifestError, ShardedIndex, brute_force_search, hamming_distances_packed
from dcgh_dist.index.build import build_index
from dcgh_dist.index.codes import code_shard_meta, codes_table
from dcgh_dist.index.filters import SearchFilter
from dcgh_dist.index.manifest import read_manifest, version_manifest_name
from dcgh_dist.index.update import compact_index, delete_ids

REPO = Path(__file__).resolve().parents[1]
BITS, CLASSES, NLIST = 64, 6, 16
TYPES = ("flat", "ivf", "multihash")


def _codes_file(path: Path, ids, codes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(codes_table(np.asarray(ids, np.int64), codes, code_shard_meta(BITS, "fp-live", "image")), path)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3,000 codes over 60 values: ids 0..999 (part a, contiguous), 1,000 scattered ids (part b),
    1000..1999 (part c); 1-3 labels of 6 classes each, in a dataset for --labels."""
    root = tmp_path_factory.mktemp("live")
    rng = np.random.default_rng(11)
    distinct = rng.integers(0, 256, (60, BITS // 8), dtype=np.uint8)
    codes = distinct[rng.integers(0, 60, 3000)]
    ids = np.concatenate([np.arange(1000), 50_000 + rng.choice(10**6, 1000, replace=False), np.arange(1000, 2000)])
    labels = [sorted(rng.choice(CLASSES, rng.integers(1, 4), replace=False).tolist()) for _ in ids]
    info = DatasetInfo(name="live", num_classes=CLASSES, class_names=tuple(f"c{c}" for c in range(CLASSES)),
                       image_column="image_features", text_column="text_features",
                       image_feature_dim=2, text_feature_dim=2)
    write_dataset(str(root / "dataset"), info, [
        {"id": int(i), "labels": lab, "split": "db", "image_features": [0.0, 1.0], "text_features": [1.0, 0.0]}
        for i, lab in zip(ids, labels)])
    parts = [_codes_file(root / "codes" / f"{name}.parquet", ids[sl], codes[sl])
             for name, sl in (("a", slice(0, 1000)), ("b", slice(1000, 2000)), ("c", slice(2000, 3000)))]
    multihot = np.zeros((len(ids), CLASSES), bool)
    for r, lab in enumerate(labels):
        multihot[r, lab] = True
    return {"root": root, "ids": ids.astype(np.int64), "codes": codes, "labels": multihot,
            "dataset": str(root / "dataset"), "parts": parts}


def queries(data, n=40, seed=5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    near = data["codes"][rng.integers(0, len(data["codes"]), n // 2)]
    flips = rng.integers(0, 256, near.shape, dtype=np.uint8) & rng.integers(0, 256, near.shape, dtype=np.uint8)
    rand = rng.integers(0, 256, (n - n // 2, BITS // 8), dtype=np.uint8)
    return np.concatenate([near ^ (flips & 0x21), rand])


def config(index_type: str, **kw) -> IndexConfig:
    return IndexConfig(index_type=index_type, shard_size=400, nlist=NLIST, nprobe=NLIST, **kw)


@pytest.fixture(scope="module", params=TYPES)
def live(request, data, tmp_path_factory):
    """Built from part a, parts b and c appended, then 400 ids deleted (and 5 that were never
    there): every shard has tombstones, shards come from three builds and both id layouts."""
    t = request.param
    d = str(tmp_path_factory.mktemp(f"live-{t}") / "idx")
    a, b, c = data["parts"]
    versions = [build_index(a, d, config(t), use_ray=False, labels_uri=data["dataset"])]
    versions.append(build_index(b, d, config(t), use_ray=False, append=True, labels_uri=data["dataset"]))
    versions.append(build_index(c, d, config(t), use_ray=False, append=True, labels_uri=data["dataset"]))
    gone = np.random.default_rng(2).choice(data["ids"], 400, replace=False)
    m, result = delete_ids(d, np.concatenate([gone, [-5, 7_000_000, 7_000_001, 7_000_002, 7_000_003]]))
    versions.append(m)
    assert (result.requested, result.deleted, result.already_deleted, result.not_found) == (405, 400, 0, 5)
    keep = ~np.isin(data["ids"], gone)
    return {"type": t, "dir": d, "keep": keep, "gone": gone, "versions": versions}


def live_set(data, keep):
    return data["ids"][keep], data["codes"][keep]


def probed(index: ShardedIndex, q: np.ndarray, nprobe: int, flt=None) -> list[np.ndarray]:
    """Per query, the ids an IVF search with ``nprobe`` looks at: those in the inverted lists it
    visits, and every id of a shard where the filter is selective (scanned exactly)."""
    import faiss

    from dcgh_dist.index.search import SELECTIVE

    out = [[] for _ in q]
    for s in range(len(index.manifest.shards)):
        ix = index._shards()[s]
        mask = index.view(s).allowed(flt, index.num_classes)
        if mask is not None and mask.sum() * SELECTIVE <= len(mask):
            for o in out:
                o.append(index.ids(s, live=False))
            continue
        _, lists = faiss.downcast_IndexBinary(ix.quantizer).search(q, nprobe)
        inv = ix.invlists
        for j, row in enumerate(lists):
            out[j] += [faiss.rev_swig_ptr(inv.get_ids(int(li)), inv.list_size(int(li))).copy() for li in row]
    return [np.concatenate(o) for o in out]


def assert_ivf_equals_brute_force_over_what_it_probes(index, q, k, nprobe, ids, codes, flt=None):
    """An IVF search with a low nprobe, filtered or with tombstones: the k best of the allowed
    items in the probed lists (as many as there are), distances equal, ids among the tied."""
    D, I = index.search(q, k, nprobe=nprobe, filter=flt)
    for j, seen in enumerate(probed(index, q, nprobe, flt)):
        m = np.isin(ids, seen)
        d = hamming_distances_packed(q[j:j + 1], codes[m])[0]
        want = np.sort(d)[:k]
        n = len(want)
        assert np.array_equal(D[j, :n], want) and (I[j, n:] == -1).all(), f"query {j}"
        assert set(I[j, :n].tolist()) <= set(ids[m][d <= want[-1]].tolist()) if n else True


def _probed_reference(index, q, k, nprobe, ids, codes, flt) -> np.ndarray:
    """Per query, the k best distances among the allowed items the probed lists hold
    (int32 max where there are fewer)."""
    out = np.full((len(q), k), np.iinfo(np.int32).max, dtype=np.int64)
    for j, seen in enumerate(probed(index, q, nprobe, flt)):
        d = np.sort(hamming_distances_packed(q[j:j + 1], codes[np.isin(ids, seen)])[0])[:k]
        out[j, :len(d)] = d
    return out


def assert_no(ids: np.ndarray, forbidden: np.ndarray) -> None:
    assert not np.isin(ids[ids >= 0], forbidden).any(), "a deleted or filtered-out id was returned"


# --------------------------------------------------------------------------------------------
# Search over the live set


def test_the_live_index_records_its_history(live, data):
    m = read_manifest(live["dir"])
    assert [v.operation for v in live["versions"]] == ["build", "append", "append", "delete"]
    assert [v.version for v in live["versions"]] == [1, 2, 3, 4] and m.version == 4
    assert m.parent == live["versions"][2].build_id
    assert m.num_items == 3000 and m.num_live == 2600 and m.num_deleted == 400
    assert {s.id_layout for s in m.shards} == ({"ids"} if live["type"] == "ivf" else {"offset", "ids"})
    assert all(s.tombstones for s in m.shards) and m.num_classes == CLASSES
    assert len(ShardedIndex.open(live["dir"])) == 2600


@pytest.mark.parametrize("k", [1, 10, 100])
def test_search_equals_brute_force_over_the_live_set(live, data, k):
    ids, codes = live_set(data, live["keep"])
    q = queries(data)
    index = ShardedIndex.open(live["dir"])
    if live["type"] == "multihash":
        # k-NN in a multihash index reaches only its radius; its exact search is the range search.
        r = index.manifest.index.exact_radius(BITS)
        lims, D, I = index.range_search(q, r)
        full = hamming_distances_packed(q, codes)
        for j in range(len(q)):
            assert np.array_equal(np.sort(I[lims[j]:lims[j + 1]]), np.sort(ids[full[j] <= r]))
        assert_no(index.search(q, k)[1], live["gone"])
        return
    want_D, want_I = brute_force_search(q, codes, ids, k)
    D, I = index.search_stable(q, k)
    assert np.array_equal(D, want_D) and np.array_equal(I, want_I)
    D, I = index.search(q, k)  # FAISS's own order of ties: the same distances, no deleted id
    assert np.array_equal(D, want_D) and (I >= 0).all()
    assert_no(I, live["gone"])
    if live["type"] == "ivf":
        assert_ivf_equals_brute_force_over_what_it_probes(index, q, k, 2, ids, codes)


def test_range_search_skips_the_deleted(live, data):
    ids, codes = live_set(data, live["keep"])
    q = queries(data)
    index = ShardedIndex.open(live["dir"])
    r = 6 if live["type"] == "multihash" else 20
    lims, D, I = index.range_search(q, r)
    full = hamming_distances_packed(q, codes)
    for j in range(len(q)):
        assert np.array_equal(np.sort(I[lims[j]:lims[j + 1]]), np.sort(ids[full[j] <= r]))


# --------------------------------------------------------------------------------------------
# Filters

FILTERS = {
    "any-of": dict(labels_any=[0]),  # broad: about half the items
    "all-of": dict(labels_all=[1, 2]),  # narrower
    "any-and-all": dict(labels_any=[3, 4], labels_all=[5]),
    "ids": dict(ids=list(range(0, 2000, 97)) + [-1, 9_999_999]),  # selective, some deleted, some unknown
    "ids-and-label": dict(ids=list(range(0, 2000, 3)), labels_any=[2]),
}


def allowed(data, keep, spec) -> np.ndarray:
    ok = keep.copy()
    if "ids" in spec:
        ok &= np.isin(data["ids"], spec["ids"])
    if "labels_any" in spec:
        ok &= data["labels"][:, spec["labels_any"]].any(axis=1)
    if "labels_all" in spec:
        ok &= data["labels"][:, spec["labels_all"]].all(axis=1)
    return ok


@pytest.mark.parametrize("left_out_fetch", ["default", 0])
@pytest.mark.parametrize("name", list(FILTERS))
def test_filtered_search_equals_brute_force_over_the_filtered_set(live, data, name, left_out_fetch, monkeypatch):
    """Every path of a filtered search: with the default LEFT_OUT_FETCH these small shards take
    the fetch-k-plus-the-left-out path; with 0, the gathered scan (flat) and the broad-filter
    fetch with its exact fallback (IVF, multihash)."""
    import dcgh_dist.index.search as search_mod

    if left_out_fetch == 0:
        monkeypatch.setattr(search_mod, "LEFT_OUT_FETCH", 0)
    spec = FILTERS[name]
    flt = SearchFilter.of(**spec)
    ok = allowed(data, live["keep"], spec)
    ids, codes = data["ids"][ok], data["codes"][ok]
    q = queries(data)
    index = ShardedIndex.open(live["dir"])
    k = 10
    if live["type"] == "multihash":
        r = index.manifest.index.exact_radius(BITS)
        lims, D, I = index.range_search(q, r, filter=flt)
        full = hamming_distances_packed(q, codes)
        for j in range(len(q)):
            assert np.array_equal(np.sort(I[lims[j]:lims[j + 1]]), np.sort(ids[full[j] <= r]))
        assert_no(index.search(q, k, filter=flt)[1], data["ids"][~ok])
        return
    want_D, want_I = brute_force_search(q, codes, ids, k)
    D, I = index.search_stable(q, k, filter=flt)
    assert np.array_equal(D, want_D) and np.array_equal(I, want_I)
    if live["type"] == "ivf":
        D, I = index.search(q, k, nprobe=2, filter=flt)
        assert_no(I, data["ids"][~ok])
        if ok.sum() * 16 <= 3000:  # selective: the allowed items are scanned exactly, whatever nprobe
            assert np.array_equal(D, want_D)
        elif left_out_fetch == "default":
            assert_ivf_equals_brute_force_over_what_it_probes(index, q, k, 2, ids, codes, flt)
        else:
            # Broad: what the probed lists hold, or (a query they leave short) the exact answer:
            # never worse than probing (so as many results), never better than exact, in order.
            probed_D = _probed_reference(index, q, k, 2, ids, codes, flt)
            assert (D >= want_D).all() and (D <= probed_D).all()
            assert (np.diff(D, axis=1) >= 0).all() and all(len(set(r[r >= 0])) == (r >= 0).sum() for r in I)


def test_a_filter_with_fewer_than_k_items_gives_them_all_then_nothing(live, data):
    few = [int(i) for i in data["ids"][live["keep"]][:5]]
    index = ShardedIndex.open(live["dir"])
    D, I = index.search_stable(queries(data), 10, filter=SearchFilter.of(ids=few + [int(live["gone"][0])]))
    assert all(sorted(row[:5].tolist()) == sorted(few) for row in I) and (I[:, 5:] == -1).all()


def test_bad_filters_are_refused_naming_the_problem(live, data, tmp_path):
    index = ShardedIndex.open(live["dir"])
    q = queries(data, 2)
    with pytest.raises(ValueError, match=r"class 6 is not one of the index's 6 classes"):
        index.search(q, 5, filter=SearchFilter.of(labels_any=[6]))
    with pytest.raises(ValueError, match="at least one class"):
        SearchFilter.of(labels_all=[])
    plain = str(tmp_path / "plain")
    build_index(data["parts"][0], plain, config("flat"), use_ray=False)
    with pytest.raises(ValueError, match="has no labels, so it cannot filter by label"):
        ShardedIndex.open(plain).search(q, 5, filter=SearchFilter.of(labels_any=[0]))


# --------------------------------------------------------------------------------------------
# Versions, compaction, refusals


def test_every_kept_version_still_opens_with_its_own_results(live, data):
    """keep_builds=2: the previous version's immutable manifest opens and answers as it did (a
    server still holding it keeps working); older versions' files are gone."""
    d, vs = Path(live["dir"]), live["versions"]
    prev = ShardedIndex.open(str(d / version_manifest_name(vs[-2].build_id)))
    assert prev.ntotal == 3000 and prev.manifest.version == 3
    ids, codes = data["ids"], data["codes"]
    if live["type"] != "multihash":
        q = queries(data)
        assert np.array_equal(prev.search_stable(q, 10)[1], brute_force_search(q, codes, ids, 10)[1])
    names = sorted(p.name for p in d.iterdir() if p.name.startswith("manifest-"))
    assert names == sorted(version_manifest_name(v.build_id) for v in vs[-2:])
    m = read_manifest(str(d))
    assert sorted(os.listdir(d / "shards")) == sorted(m.retained_builds)
    assert set(m.retained_builds) == set(vs[-2].dirs()) | set(m.dirs())


def test_compaction_folds_tombstones_and_small_shards(live, data, tmp_path):
    import shutil

    d = str(tmp_path / "idx")
    shutil.copytree(live["dir"], d)
    before = read_manifest(d)
    q = queries(data)
    index = ShardedIndex.open(d)
    want = index.search_stable(q, 10) if live["type"] != "multihash" else index.range_search(q, 6)
    m = compact_index(d)
    assert m.operation == "compact" and m.version == before.version + 1 and m.num_deleted == 0
    assert m.num_items == m.num_live == 2600
    assert [s.rows for s in m.shards] == [400] * 6 + [200] and not any(s.tombstones for s in m.shards)
    after = ShardedIndex.open(d)
    got = after.search_stable(q, 10) if live["type"] != "multihash" else after.range_search(q, 6)
    for w, g in zip(want, got):
        assert np.array_equal(w, g)
    flt = SearchFilter.of(labels_all=[1, 2])
    if live["type"] != "multihash":
        assert np.array_equal(index.search_stable(q, 10, filter=flt)[1], after.search_stable(q, 10, filter=flt)[1])
    assert compact_index(d).build_id == m.build_id  # nothing left to fold: no new version
    # The version before compaction still opens (its shards are kept) and still hides the deleted.
    old = ShardedIndex.open(os.path.join(d, version_manifest_name(before.build_id)))
    assert old.ntotal == 2600
    assert_no(old.search(q, 10)[1], live["gone"])


def test_appending_a_live_id_is_refused_and_a_deleted_one_comes_back(data, tmp_path):
    d = str(tmp_path / "idx")
    a = data["parts"][0]  # ids 0..999
    build_index(a, d, config("flat"), use_ray=False)
    again = _codes_file(tmp_path / "again.parquet", [5, 1_000_000], data["codes"][:2])
    with pytest.raises(ValueError, match=r"id 5 \(1 in all\) is already in .* delete them first"):
        build_index(again, d, config("flat"), use_ray=False, append=True)
    assert read_manifest(d).version == 1  # nothing committed
    new_code = ~data["codes"][5:6]
    delete_ids(d, [5])
    m = build_index(_codes_file(tmp_path / "five.parquet", [5], new_code), d, config("flat"), use_ray=False,
                    append=True)
    assert m.num_live == 1000 and m.num_items == 1001
    D, I = ShardedIndex.open(d).search_stable(new_code, 1)
    assert I[0, 0] == 5 and D[0, 0] == 0  # the new code, not the deleted one
    _, result = delete_ids(d, [5, 5, 123_456])
    assert (result.deleted, result.not_found) == (1, 1)  # the live copy went; the old one stays hidden
    assert ShardedIndex.open(d).ntotal == 999
    m2, result = delete_ids(d, [5])
    assert result.already_deleted == 1 and m2.version == read_manifest(d).version  # nothing new: no version


def test_appends_that_do_not_fit_are_refused(data, tmp_path):
    d = str(tmp_path / "idx")
    build_index(data["parts"][0], d, config("flat"), use_ray=False, labels_uri=data["dataset"])
    with pytest.raises(ValueError, match="carries labels of 6 classes; append with --labels"):
        build_index(data["parts"][2], d, config("flat"), use_ray=False, append=True)
    wide = tmp_path / "wide.parquet"
    pq.write_table(codes_table(np.array([10**7]), np.zeros((1, 16), np.uint8), code_shard_meta(128, "fp-live", "image")),
                   wide)
    with pytest.raises(ManifestError, match="128-bit codes cannot be appended to .* 64-bit"):
        build_index(str(wide), d, config("flat"), use_ray=False, append=True, labels_uri=data["dataset"])
    other = _codes_file(tmp_path / "other" / "x.parquet", [10**7], data["codes"][:1])
    table = pq.read_table(other)
    meta = json.loads(table.schema.metadata[b"dcgh.codes"])
    pq.write_table(table.replace_schema_metadata({b"dcgh.codes": json.dumps({**meta, "model_fingerprint": "fp-x"})}),
                   other)
    with pytest.raises(ManifestError, match="codes of model fp-x cannot be appended"):
        build_index(other, d, config("flat"), use_ray=False, append=True, labels_uri=data["dataset"])
    with pytest.raises(ManifestError, match="no index there to change"):
        build_index(data["parts"][2], str(tmp_path / "none"), config("flat"), use_ray=False, append=True)


# --------------------------------------------------------------------------------------------
# The job's commands, as a user types them


def _job(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.run([sys.executable, "jobs/build_index.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(300)
def test_delete_and_compact_commands(data, tmp_path):
    d = str(tmp_path / "idx")
    build_index(data["parts"][0], d, config("flat"), use_ray=False)
    gone = tmp_path / "gone.parquet"
    pq.write_table(pa.table({"id": pa.array([3, 4, 5, 77_777], pa.int64())}), gone)
    r = _job("--output", d, "--delete", str(gone))
    assert r.returncode == 0, r.stderr
    assert "| 4 | 3 | 0 | 1 |" in r.stdout and "not in the index (first 1): [77777]" in r.stdout
    version = [line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith("this version: ")][0]
    assert ShardedIndex.open(version).ntotal == 997 and read_manifest(version).operation == "delete"
    r = _job("--output", d, "--compact", "--shard-size", "500")
    assert r.returncode == 0, r.stderr
    m = read_manifest(d)
    assert m.operation == "compact" and [s.rows for s in m.shards] == [500, 497]
    assert ShardedIndex.open(version).ntotal == 997  # the delete's version: still readable
    r = _job("--output", d, "--delete", str(gone), "--codes", data["parts"][1])
    assert r.returncode == 2 and "read no --codes" in r.stderr
    r = _job("--output", d)
    assert r.returncode == 2 and "--codes is required" in r.stderr
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"item": [1]}), bad)
    r = _job("--output", d, "--delete", str(bad))
    assert r.returncode != 0 and "needs an 'id' column" in r.stderr


# --------------------------------------------------------------------------------------------
# Re-ranking by the relaxed codes


def test_rerank_equals_reordering_the_brute_force_top(data, tmp_path):
    """Code shards with relaxed codes (encode --relaxed): search_reranked is the brute-force
    Hamming top k x r, re-ordered by the inner product with the query's relaxed code (stable),
    cut to k; through an append, a delete and a compaction, on flat and IVF."""
    rng = np.random.default_rng(8)
    ids, codes = data["ids"], data["codes"]
    bits = np.unpackbits(codes, axis=1).astype(np.float32)
    relaxed = ((bits * 2 - 1) * rng.uniform(0.05, 1, bits.shape)).astype(np.float16)  # signs = the bits
    files = []
    for name, sl in (("a", slice(0, 1500)), ("b", slice(1500, 3000))):
        path = tmp_path / "codes" / f"{name}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(codes_table(ids[sl], codes[sl], code_shard_meta(BITS, "fp-live", "image"), relaxed=relaxed[sl]),
                       path)
        files.append(str(path))
    q = queries(data)
    q_relaxed = ((np.unpackbits(q, axis=1) * 2.0 - 1) * rng.uniform(0.05, 1, (len(q), BITS))).astype(np.float32)
    k, factor = 10, 4
    gone = rng.choice(ids, 300, replace=False)
    keep = ~np.isin(ids, gone)

    def reference():
        D, I = brute_force_search(q, codes[keep], ids[keep], k * factor)
        pos = {int(i): p for p, i in enumerate(ids)}
        S = np.einsum("qk,qmk->qm", q_relaxed, relaxed.astype(np.float32)[[[pos[int(i)] for i in row] for row in I]])
        o = np.argsort(-S, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(D, o, 1), np.take_along_axis(I, o, 1)

    for t in ("flat", "ivf"):
        d = str(tmp_path / f"idx-{t}")
        build_index(files[0], d, config(t), use_ray=False)
        build_index(files[1], d, config(t), use_ray=False, append=True)
        delete_ids(d, gone)
        want_D, want_I = reference()
        D, I, S = ShardedIndex.open(d).search_reranked(q, q_relaxed, k, factor=factor)
        assert np.array_equal(I, want_I) and np.array_equal(D, want_D) and (np.diff(S, axis=1) <= 0).all()
        compact_index(d)
        assert all(s.relaxed for s in read_manifest(d).shards)
        assert np.array_equal(ShardedIndex.open(d).search_reranked(q, q_relaxed, k, factor=factor)[1], want_I)
    plain = str(tmp_path / "plain")
    build_index(data["parts"][0], plain, config("flat"), use_ray=False)
    with pytest.raises(ValueError, match="stores no relaxed codes, so it cannot re-rank"):
        ShardedIndex.open(plain).search_reranked(q, q_relaxed, k)
    with pytest.raises(ValueError, match="carry relaxed codes .* and these codes do not"):
        build_index(data["parts"][1], str(tmp_path / "idx-flat"), config("flat"), use_ray=False, append=True)


@pytest.mark.parametrize("index_type", ["flat", "ivf"])
def test_shards_smaller_than_k_with_tombstones_and_filters(data, tmp_path, index_type):
    """k larger than a shard: every masked path still fills k from all shards together."""
    d = str(tmp_path / "idx")
    cfg = IndexConfig(index_type=index_type, shard_size=50, nlist=4, nprobe=4)
    build_index(data["parts"][0], d, cfg, use_ray=False, labels_uri=data["dataset"])
    gone = np.arange(0, 1000, 7)
    delete_ids(d, gone)
    ok = ~np.isin(np.arange(1000), gone)
    q = queries(data, 10)
    index = ShardedIndex.open(d)
    codes = data["codes"][:1000]
    for flt, mask in ((None, ok), (SearchFilter.of(labels_any=[0]), ok & data["labels"][:1000, 0])):
        D, I = index.search_stable(q, 120, filter=flt)
        want_D, want_I = brute_force_search(q, codes[mask], np.arange(1000)[mask], 120)
        assert np.array_equal(D, want_D) and np.array_equal(I, want_I)
