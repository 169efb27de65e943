"""Bit packing, sharded FAISS indexes and their search, against brute-force numpy.

Library-level: synthetic codes with many ties (few distinct codes), shards with both id layouts
(contiguous ids -> bare index + offset; scattered ids -> the index keeps them), built in-process.
The Ray-task build and the demo checkpoint are exercised in tests/test_encode_job.py. The last
section is what a long-running server relies on: parallel opening, checksums verified once per
build, memory-mapped shards, close(), concurrent searches with per-call nprobe.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import dcgh_dist.index.search as search_mod
from dcgh_dist.index import (
    BIT_ORDER,
    IndexConfig,
    ManifestError,
    ShardedIndex,
    as_packed,
    brute_force_search,
    hamming_distances_packed,
    pack_codes,
    unpack_codes,
)
from dcgh_dist.index.build import build_index, build_shard
from dcgh_dist.codes import pack_relaxed
from dcgh_dist.index.codes import code_shard_meta, codes_table, read_code_shard
from dcgh_dist.index.manifest import BuildConflictError, read_manifest, resolve_shard_uri
from dcgh_dist.index.search import IndexClosedError
from dcgh_dist.codes import binarize
from dcgh_dist.metrics import hamming_distances_unpacked

BITS = 64


# --------------------------------------------------------------------------------------------
# Bit convention


def test_bit_convention_is_packbits_big_endian():
    relaxed = np.full((1, BITS), -0.5, dtype=np.float32)
    relaxed[0, 0] = 0.3  # hash dimension 0 -> most significant bit of byte 0
    relaxed[0, 15] = 0.0  # zero counts as positive -> bit 1 (LSB of byte 1)
    packed = pack_relaxed(relaxed)
    assert packed.dtype == np.uint8 and packed.shape == (1, BITS // 8)
    assert packed[0, 0] == 0x80 and packed[0, 1] == 0x01 and not packed[0, 2:].any()
    assert "big-endian" in BIT_ORDER


@pytest.mark.parametrize("form", ["bool", "pm1", "relaxed", "01"])
def test_pack_unpack_round_trip(form):
    rng = np.random.default_rng(0)
    bits = rng.random((50, BITS)) < 0.5
    codes = {
        "bool": bits,
        "pm1": np.where(bits, 1.0, -1.0),
        "relaxed": np.where(bits, 1, -1) * rng.uniform(1e-4, 1, bits.shape).astype(np.float32),
        "01": bits.astype(np.int64),
    }[form]
    packed = pack_codes(codes)
    assert np.array_equal(unpack_codes(packed, BITS), bits)
    # The same bits dcgh_dist.metrics sees.
    assert np.array_equal(unpack_codes(packed), binarize(codes))
    # Queries in any form pack the same way; packed queries pass through unchanged.
    assert np.array_equal(as_packed(codes, BITS), packed)
    assert as_packed(packed, BITS) is not None and np.array_equal(as_packed(packed, BITS), packed)
    if form == "relaxed":
        assert np.array_equal(pack_relaxed(codes), packed)


def test_pack_errors_are_clear():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(np.ones((2, 12)))
    with pytest.raises(ValueError, match="expected 8 packed uint8 bytes or 64"):
        as_packed(np.ones((2, 32)), BITS)
    with pytest.raises(ValueError, match="NaN"):
        pack_relaxed(np.full((1, 8), np.nan))


def test_packed_hamming_matches_the_metrics_module():
    rng = np.random.default_rng(1)
    q, d = rng.random((7, BITS)) < 0.5, rng.random((30, BITS)) < 0.5
    assert np.array_equal(hamming_distances_packed(pack_codes(q), pack_codes(d)), hamming_distances_unpacked(q, d))


# --------------------------------------------------------------------------------------------
# Fixtures: code shards with heavy ties


def tied_codes(n: int, distinct: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (distinct, BITS // 8), dtype=np.uint8)
    return base[rng.integers(0, distinct, n)]


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
    """2,000 codes over 60 distinct values in 4 files of 700, 300, 500, 500 rows: files 0 and 1
    hold ids 0..699 and 700..999 (shuffled inside each), files 2-3 scattered ids. With 700-code
    shards, shard 0 is contiguous (bare index + offset), the others keep their ids, and shard
    boundaries fall inside files."""
    root = tmp_path_factory.mktemp("codes")
    rng = np.random.default_rng(3)
    codes = tied_codes(2000, 60, seed=4)
    ids = np.concatenate([rng.permutation(700), 700 + rng.permutation(300),
                          10_000 + rng.choice(10**6, 1000, replace=False)])
    meta = code_shard_meta(BITS, "fp-test", "image")
    bounds = [0, 700, 1000, 1500, 2000]
    for f in range(4):
        sl = slice(bounds[f], bounds[f + 1])
        pq.write_table(codes_table(ids[sl], codes[sl], meta), root / f"part-{f:05d}.parquet")
    return str(root), ids.astype(np.int64), codes


def queries(n=60, seed=9):
    # Half near the database's codes (many ties at small distances), half random.
    near = tied_codes(n // 2, 60, seed=4)
    flips = np.random.default_rng(seed).integers(0, 256, near.shape, dtype=np.uint8)
    flips &= np.random.default_rng(seed + 1).integers(0, 256, near.shape, dtype=np.uint8)
    rand = np.random.default_rng(seed + 2).integers(0, 256, (n - n // 2, BITS // 8), dtype=np.uint8)
    return np.concatenate([near ^ (flips & 0x11), rand])


def assert_knn_tie_aware(D, I, q, db_codes, db_ids, k):
    """FAISS's results vs a brute-force scan: the same distance list for every query, the same id
    set at every distance below the k-th, and ids at the k-th distance drawn from the tied ones."""
    full = hamming_distances_packed(q, db_codes)
    for r in range(len(q)):
        ref = np.sort(full[r])[:k]
        assert np.array_equal(D[r], ref), f"query {r}: distances differ"
        assert len(set(I[r].tolist())) == k, f"query {r}: duplicate ids"
        dk = ref[-1]
        for d in np.unique(ref):
            got = set(I[r][D[r] == d].tolist())
            want = set(db_ids[full[r] == d].tolist())
            if d < dk:
                assert got == want, f"query {r}, distance {d}: id sets differ"
            else:
                assert got <= want, f"query {r}: ids at the k-th distance {d} are not tied items"


@pytest.fixture(scope="module")
def built(code_dir, tmp_path_factory):
    """One index per type, 700-code shards (3 shards), built in-process."""
    root, _, _ = code_dir
    out = {}
    for t in ("flat", "ivf", "multihash"):
        d = str(tmp_path_factory.mktemp(f"idx-{t}"))
        build_index(root, d, IndexConfig(index_type=t, shard_size=700, nlist=16, nprobe=4),
                    use_ray=False)
        out[t] = d
    return out


# --------------------------------------------------------------------------------------------
# Search vs brute force


@pytest.mark.parametrize("k", [1, 10, 100])
def test_flat_knn_equals_brute_force(code_dir, built, k):
    _, ids, codes = code_dir
    index = ShardedIndex.open(built["flat"])
    assert index.exact and len(index) == 2000
    layouts = {s.id_layout for s in index.manifest.shards}
    assert layouts == {"offset", "ids"}  # both id layouts are exercised
    q = queries()
    D, I = index.search(q, k)
    assert_knn_tie_aware(D, I, q, codes, ids, k)
    # ±1 and relaxed queries give the same result as packed ones.
    D2, _ = index.search(np.where(unpack_codes(q), 0.7, -0.2), k)
    assert np.array_equal(D, D2)
    # Few queries take the thread-per-shard path (one FAISS thread in each): same distances, and
    # the caller's FAISS thread count is left alone.
    import faiss

    threads = faiss.omp_get_max_threads()
    D3, _ = index.search(q[:1], k)
    assert np.array_equal(D3, D[:1]) and faiss.omp_get_max_threads() == threads


def test_a_build_leaves_the_callers_faiss_threads_alone(code_dir, tmp_path):
    # OpenMP's thread count is the calling thread's. Builds once set it to a Ray task's 1 and left
    # it there: every later ShardedIndex.open from that thread then searched its shards one after
    # another.
    import faiss

    root, _, _ = code_dir
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(3)
    try:
        build_index(root, str(tmp_path / "ivf"), IndexConfig(index_type="ivf", shard_size=700, nlist=16),
                    use_ray=False)
        assert faiss.omp_get_max_threads() == 3
        # A Ray task's build runs with its CPUs' threads, and restores them for the worker's next task.
        entry = build_shard(root, [(os.path.join(root, "part-00000.parquet"), 0, 100)], BITS, IndexConfig(),
                            str(tmp_path / "one.faissindex"), "one.faissindex", threads=1)
        assert entry.rows == 100 and faiss.omp_get_max_threads() == 3
    finally:
        faiss.omp_set_num_threads(before)


def test_search_stable_is_deterministic_and_equals_id_ordered_brute_force(code_dir, built):
    _, ids, codes = code_dir
    index = ShardedIndex.open(built["flat"])
    q = queries()
    for k, margin in [(10, None), (50, 0)]:  # margin 0 forces the range-search tie completion
        D, I = index.search_stable(q, k, margin=margin)
        bD, bI = brute_force_search(q, codes, ids, k)
        assert np.array_equal(D, bD) and np.array_equal(I, bI)
    # More than the database holds: everything, then -1.
    D, I = index.search_stable(q[:3], 2100)
    assert (I[:, 2000:] == -1).all() and set(I[0, :2000].tolist()) == set(ids.tolist())


def test_flat_range_search_is_exact(code_dir, built):
    _, ids, codes = code_dir
    index = ShardedIndex.open(built["flat"])
    q = queries()
    full = hamming_distances_packed(q, codes)
    for radius in (0, 5, 20):
        lims, D, I = index.range_search(q, radius)
        for r in range(len(q)):
            got = I[lims[r]:lims[r + 1]]
            want = np.sort(ids[full[r] <= radius])
            assert np.array_equal(np.sort(got), want)
            assert (D[lims[r]:lims[r + 1]] <= radius).all()


def test_multihash_range_search_is_exact_up_to_its_radius(code_dir, built):
    _, ids, codes = code_dir
    index = ShardedIndex.open(built["multihash"])
    exact_r = index.manifest.index.exact_radius(BITS)
    assert exact_r == 7  # 4 hashes of 16 bits, 1 flip: pigeonhole bound 4 * 2 - 1
    q = queries()
    full = hamming_distances_packed(q, codes)
    lims, D, I = index.range_search(q, exact_r)
    assert lims[-1] > 0
    for r in range(len(q)):
        assert np.array_equal(np.sort(I[lims[r]:lims[r + 1]]), np.sort(ids[full[r] <= exact_r]))
    with pytest.raises(ValueError, match="exceeds what this multihash index searches exactly"):
        index.range_search(q, exact_r + 1)


def test_ivf_recall(code_dir, built, capsys):
    _, ids, codes = code_dir
    index = ShardedIndex.open(built["ivf"])
    assert not index.exact
    q = queries()
    k = 10
    bD, _ = brute_force_search(q, codes, ids, k)
    full = hamming_distances_packed(q, codes)
    recalls = {}
    pos = {int(i): p for p, i in enumerate(ids)}
    dk = bD[:, -1]
    for nprobe in (1, 4, 16):
        D, I = index.search(q, k, nprobe=nprobe)
        # Tie-aware recall@k: a hit is a returned id within the true k-th distance.
        hits = sum(1 for r in range(len(q)) for i in I[r] if i >= 0 and full[r, pos[int(i)]] <= dk[r])
        recalls[nprobe] = hits / (len(q) * k)
    print("ivf recall@10 by nprobe:", recalls)
    assert recalls[16] == 1.0  # every list probed: exact
    assert 0 < recalls[1] <= recalls[4] <= recalls[16]


# --------------------------------------------------------------------------------------------
# Manifest and integrity


def test_manifest_contents(code_dir, built):
    m = json.loads(open(os.path.join(built["ivf"], "manifest.json")).read())
    assert m["format"] == "dcgh-dist-index-v1" and m["bits"] == BITS and m["bit_order"] == BIT_ORDER
    assert m["index"]["index_type"] == "ivf" and m["index"]["nlist"] == 16
    assert m["model_fingerprint"] == "fp-test" and m["num_items"] == 2000
    assert [s["rows"] for s in m["shards"]] == [700, 700, 600]
    for s in m["shards"]:
        assert len(s["sha256"]) == 64 and s["id_min"] <= s["id_max"]
        assert os.path.getsize(os.path.join(built["ivf"], s["uri"])) == s["bytes"]


def test_reader_refuses_other_model_and_bit_width(built):
    with pytest.raises(ManifestError, match="not of the expected model other-model"):
        ShardedIndex.open(built["flat"], expected_fingerprint="other-model")
    with pytest.raises(ManifestError, match="holds 64-bit codes, expected 32 bits"):
        ShardedIndex.open(built["flat"], expected_bits=32)
    ShardedIndex.open(built["flat"], expected_fingerprint="fp-test", expected_bits=64)


def _copy_index(src: str, dst) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_corrupted_or_truncated_shard_is_refused(built, tmp_path):
    d = _copy_index(built["flat"], tmp_path / "idx")
    m = json.loads(open(os.path.join(d, "manifest.json")).read())
    shard = os.path.join(d, m["shards"][1]["uri"])
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    open(shard, "wb").write(bytes(data))
    with pytest.raises(ManifestError, match=r"shard 1 .*sha256 .* does not match"):
        ShardedIndex.open(d)
    open(shard, "wb").write(bytes(data[:-10]))
    with pytest.raises(ManifestError, match=r"shard 1 .*bytes on disk, manifest says"):
        ShardedIndex.open(d)
    os.remove(shard)
    with pytest.raises(ManifestError, match="file missing"):
        ShardedIndex.open(d)


def test_manifest_with_other_bit_width_or_order_is_refused(built, tmp_path):
    d = _copy_index(built["flat"], tmp_path / "idx")
    path = os.path.join(d, "manifest.json")
    m = json.loads(open(path).read())
    m["bits"] = 32
    open(path, "w").write(json.dumps(m))
    with pytest.raises(ManifestError, match="index has 64-bit codes, manifest says 32"):
        ShardedIndex.open(d)
    m["bits"], m["bit_order"] = 64, "little-endian"
    open(path, "w").write(json.dumps(m))
    with pytest.raises(ManifestError, match="bit order"):
        ShardedIndex.open(d)
    with pytest.raises(ManifestError, match="no index manifest"):
        ShardedIndex.open(str(tmp_path / "nowhere"))


def test_build_refuses_bad_inputs(code_dir, tmp_path):
    root, _, _ = code_dir
    with pytest.raises(ManifestError, match="codes were made by model fp-test"):
        build_index(root, str(tmp_path / "a"), IndexConfig(), expected_fingerprint="other", use_ray=False)
    dup = tmp_path / "dup"
    dup.mkdir()
    c = tied_codes(10, 3, 0)
    pq.write_table(codes_table(np.arange(10), c, None), dup / "a.parquet")
    pq.write_table(codes_table(np.arange(5, 15), c, None), dup / "b.parquet")
    with pytest.raises(ValueError, match="id 5 appears 2 times"):
        build_index(str(dup), str(tmp_path / "b"), IndexConfig(shard_size=10), use_ray=False)
    with pytest.raises(ValueError, match="id 5 appears more than once"):
        build_index(str(dup), str(tmp_path / "c"), IndexConfig(shard_size=100), use_ray=False)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    pq.write_table(codes_table(np.arange(3), c[:3], None), mixed / "a.parquet")
    pq.write_table(codes_table(np.arange(3, 6), np.zeros((3, 4), np.uint8), None), mixed / "b.parquet")
    with pytest.raises(ValueError, match="different bit widths"):
        build_index(str(mixed), str(tmp_path / "d"), IndexConfig(), use_ray=False)


def test_rebuild_keeps_the_previous_build_for_its_readers(code_dir, tmp_path):
    """keep_builds=2 (default): a rebuild keeps the previous build's shards, so a reader that
    still holds the previous manifest can (re)open them; the build after deletes them."""
    root, _, _ = code_dir
    d = str(tmp_path / "idx")
    m1 = build_index(root, d, IndexConfig(shard_size=1000), use_ray=False)
    old_manifest = Path(d, "manifest.json").read_text()
    m2 = build_index(root, d, IndexConfig(shard_size=600), use_ray=False)
    assert m1.build_id != m2.build_id and m2.retained_builds == [m2.build_id, m1.build_id]
    assert sorted(os.listdir(os.path.join(d, "shards"))) == sorted([m1.build_id, m2.build_id])
    Path(d, "previous.json").write_text(old_manifest)  # what a long-running server still holds
    q = queries(8)
    assert np.array_equal(ShardedIndex.open(d).search(q, 5)[0],
                          ShardedIndex.open(os.path.join(d, "previous.json")).search(q, 5)[0])
    m3 = build_index(root, d, IndexConfig(shard_size=700), use_ray=False)
    assert m3.retained_builds == [m3.build_id, m2.build_id]
    assert sorted(os.listdir(os.path.join(d, "shards"))) == sorted([m2.build_id, m3.build_id])
    assert not os.path.exists(lock_path(d))  # released


def test_rebuild_deletes_only_builds_its_manifests_recorded(code_dir, tmp_path):
    root, _, _ = code_dir
    d = tmp_path / "idx"
    m1 = build_index(root, str(d), IndexConfig(shard_size=1000), use_ray=False)
    (d / "shards" / "foreign").mkdir()  # not a build of this index: never touched
    (d / "shards" / "foreign" / "data").write_text("x")
    (d / "shards" / "README").write_text("x")
    # A manifest from before retention (no retained_builds): its own build is the chain.
    man = json.loads((d / "manifest.json").read_text())
    del man["retained_builds"]
    (d / "manifest.json").write_text(json.dumps(man))
    m2 = build_index(root, str(d), IndexConfig(shard_size=1000, keep_builds=1), use_ray=False)
    assert m2.retained_builds == [m2.build_id]
    assert sorted(os.listdir(d / "shards")) == sorted(["foreign", "README", m2.build_id])
    assert (d / "shards" / "foreign" / "data").exists() and m1.build_id != m2.build_id
    with pytest.raises(ValueError, match="keep_builds must be >= 1"):
        IndexConfig(keep_builds=0)


def test_keep_builds_flag():
    from dcgh_dist.jobs import build_index as build_job

    args = build_job.parse_args(["--codes", "c", "--output", "o", "--keep-builds", "3"])
    assert build_job.job_config(args).index.keep_builds == 3
    assert build_job.job_config(build_job.parse_args(["--codes", "c", "--output", "o"])).index.keep_builds == 2


@pytest.mark.parametrize("bad", ["../../victim", ".", "..", "a/b", "/abs", ".hidden", "x" * 129, 7])
def test_rebuild_refuses_a_manifest_whose_build_id_is_a_path(code_dir, tmp_path, bad):
    """A build_id that could name a directory outside shards/ (or shards/ itself) is refused when
    the manifest is read: the rebuild deletes nothing, not the victim, not its own new shards."""
    root, _, _ = code_dir
    d = tmp_path / "idx"
    build_index(root, str(d), IndexConfig(shard_size=1000, keep_builds=1), use_ray=False)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("x")
    man = json.loads((d / "manifest.json").read_text())
    man["build_id"] = bad
    man.pop("retained_builds", None)
    (d / "manifest.json").write_text(json.dumps(man))
    before = sorted(os.listdir(d / "shards"))
    with pytest.raises(ManifestError, match=r"manifest.json: build_id .* is not a build id"):
        build_index(root, str(d), IndexConfig(shard_size=1000, keep_builds=1), use_ray=False)
    assert (victim / "precious").exists() and sorted(os.listdir(d / "shards")) == before
    with pytest.raises(ManifestError, match="build_id"):
        ShardedIndex.open(str(d))


def _manifest_with(built: str, tmp_path, edit) -> str:
    d = _copy_index(built, tmp_path / "idx")
    path = Path(d, "manifest.json")
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    return d


@pytest.mark.parametrize("bad", ["../../etc/hosts", "/etc/hosts", "file:///etc/hosts", "s3://other/x",
                                 "shards//x", "shards/./x", "", "shards/x/..", "a\\..\\b"])
def test_shard_uri_outside_the_index_is_refused(built, tmp_path, bad):
    d = _manifest_with(built["flat"], tmp_path, lambda m: m["shards"][1].update(uri=bad))
    with pytest.raises(ManifestError, match=r"shard 1 uri .* relative paths below the manifest"):
        ShardedIndex.open(d)
    with pytest.raises(ManifestError, match="relative paths below"):
        resolve_shard_uri(os.path.join(d, "manifest.json"), bad)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["shards"][0].update(sha256="../../victim"), r"shard 0: sha256 '../../victim' is not 64"),
    (lambda m: m["shards"][0].update(id_layout="x"), "id_layout 'x'"),
    (lambda m: m.update(retained_builds=[m["build_id"], "../x"]), r"retained_builds entry '../x'"),
    (lambda m: m.update(retained_builds=["other"]), "must start with this manifest's build_id"),
    (lambda m: m.update(retained_builds=[m["build_id"]] * 2), "names a build twice"),
    (lambda m: m.update(retained_builds="abc"), "is not a list"),
])
def test_manifest_fields_that_name_files_are_checked(built, tmp_path, edit, match):
    """The sha256 names the S3 download's file in the cache (and a bad copy there is deleted);
    retained_builds names directories a rebuild deletes."""
    d = _manifest_with(built["flat"], tmp_path, edit)
    with pytest.raises(ManifestError, match=match):
        ShardedIndex.open(d)


# --------------------------------------------------------------------------------------------
# One build at a time


def lock_path(index_dir) -> str:
    return os.path.join(str(index_dir), "build.lock")


_HOLD_LOCK = """
import sys
from dcgh_dist.index.lock import build_lock
with build_lock(sys.argv[1], "20250101-000000-other", sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_second_build_is_refused_while_another_process_holds_the_lock(code_dir, tmp_path, caplog):
    import subprocess
    import sys

    root, _, _ = code_dir
    d = str(tmp_path / "idx")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, d], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BuildConflictError,
                           match=rf"build 20250101-000000-other \(pid {holder.pid} on .*, since "):
            build_index(root, d, IndexConfig(shard_size=1000), use_ray=False)
        assert not os.path.exists(os.path.join(d, "manifest.json"))
    finally:
        holder.kill()  # dies holding it: the lock file stays, its process is gone
        holder.wait()
    assert json.loads(Path(lock_path(d)).read_text())["pid"] == holder.pid
    with caplog.at_level("WARNING", logger="dcgh_dist.index.lock"):
        m = build_index(root, d, IndexConfig(shard_size=1000), use_ray=False)
    assert "taking over the build lock of build 20250101-000000-other" in caplog.text
    assert ShardedIndex.open(d).manifest.build_id == m.build_id and not os.path.exists(lock_path(d))


def test_concurrent_builds_in_threads_one_refused(code_dir, tmp_path, monkeypatch):
    """Two builds started together: the second finds the first's lock and refuses."""
    import threading

    import dcgh_dist.index.build as build_mod

    root, _, _ = code_dir
    d = str(tmp_path / "idx")
    started, release = threading.Event(), threading.Event()
    real = build_mod.build_shard

    def slow_shard(*a, **kw):
        started.set()
        release.wait(60)
        return real(*a, **kw)

    monkeypatch.setattr(build_mod, "build_shard", slow_shard)
    out = {}
    first = threading.Thread(target=lambda: out.setdefault("m", build_index(
        root, d, IndexConfig(shard_size=1000), use_ray=False)))
    first.start()
    try:
        assert started.wait(60)
        with pytest.raises(BuildConflictError, match=r"another build is running into this index: build "):
            build_index(root, d, IndexConfig(shard_size=1000), use_ray=False)
    finally:
        release.set()
        first.join()
    assert read_manifest(d).build_id == out["m"].build_id


def test_commit_refuses_a_manifest_another_build_wrote_meanwhile(code_dir, tmp_path, monkeypatch):
    """Where there is no lock (S3), two builds run side by side; the one that commits second
    finds the manifest changed and refuses instead of overwriting it."""
    import contextlib
    import threading

    import dcgh_dist.index.build as build_mod

    root, _, _ = code_dir
    d = str(tmp_path / "idx")
    first = build_index(root, d, IndexConfig(shard_size=1000), use_ray=False)
    monkeypatch.setattr(build_mod, "build_lock", lambda *a: contextlib.nullcontext())
    started, release = threading.Event(), threading.Event()
    real = build_mod.build_shard
    slow = {}

    def shard(*a, **kw):
        if threading.current_thread().name == "slow":
            started.set()
            release.wait(60)
        return real(*a, **kw)

    monkeypatch.setattr(build_mod, "build_shard", shard)

    def run_slow():
        try:
            build_index(root, d, IndexConfig(shard_size=1000), use_ray=False)
        except BuildConflictError as e:
            slow["error"] = e

    t = threading.Thread(target=run_slow, name="slow")
    t.start()
    try:
        assert started.wait(60)
        fast = build_index(root, d, IndexConfig(shard_size=1000), use_ray=False)
    finally:
        release.set()
        t.join()
    msg = str(slow["error"])
    assert "another build committed while build" in msg and f"build {fast.build_id} (created" in msg
    slow_id = msg.split("while build ")[1].split()[0]
    assert f"shards stay under shards/{slow_id}/" in msg
    assert read_manifest(d).build_id == fast.build_id  # not overwritten
    assert os.listdir(os.path.join(d, "shards", slow_id))  # the refused build's shards are kept
    assert fast.retained_builds == [fast.build_id, first.build_id]


def test_code_shard_reader_accepts_plain_binary_codes(tmp_path):
    """Shards "whoever wrote them": a binary (not fixed-size) code column without metadata."""
    import pyarrow as pa

    c = tied_codes(20, 5, 1)
    table = pa.table({"id": pa.array(np.arange(100, 120), pa.int64()),
                      "code": pa.array([bytes(r) for r in c], pa.binary())})
    pq.write_table(table, tmp_path / "x.parquet")
    import pyarrow.fs as pafs

    ids, codes = read_code_shard(pafs.LocalFileSystem(), str(tmp_path / "x.parquet"))
    assert np.array_equal(codes, c) and ids[0] == 100
    m = build_index(str(tmp_path), str(tmp_path / "idx"), IndexConfig(), use_ray=False)
    assert m.model_fingerprint is None and m.bits == 64
    D, I = ShardedIndex.open(str(tmp_path / "idx")).search(c[:3], 1)
    assert (D[:, 0] == 0).all()


# --------------------------------------------------------------------------------------------
# Metrics through the index == dcgh_dist.metrics


def test_index_metrics_equal_in_memory_metrics_with_ties(tmp_path):
    """mAP@k, NDCG@k, P@k from top-k retrieval equal dcgh_dist.metrics' whole-ranking values.

    Few distinct codes make ties at the k-th distance the rule, not the exception, so the
    tie handling (rank by distance, then id = database order) is what is being tested.
    """
    from dcgh_dist.data.format import DatasetInfo, write_dataset
    from dcgh_dist.data.labels import LabelTable
    from dcgh_dist.index.evaluate import index_retrieval_metrics
    from dcgh_dist.metrics import retrieval_metrics

    rng = np.random.default_rng(5)
    n_db, n_q, C = 700, 40, 6
    db_ids = np.sort(rng.choice(5000, n_db, replace=False)) + 1  # scattered ids
    q_ids = np.arange(-n_q, 0)  # queries: their own ids, split "query"
    labels = {int(i): sorted(set(rng.integers(0, C, rng.integers(1, 4)).tolist()))
              for i in np.concatenate([db_ids, q_ids])}
    info = DatasetInfo(name="t", num_classes=C, class_names=tuple("abcdef"))
    rows = [{"id": int(i), "labels": labels[int(i)], "split": "query" if i < 0 else "db",
             "image": b"x", "text": "t"} for i in np.concatenate([q_ids, db_ids])]
    write_dataset(str(tmp_path / "data"), info, rows, rows_per_file=300)

    db_codes, q_codes = tied_codes(n_db, 25, seed=6), tied_codes(n_q, 25, seed=6)
    perm = rng.permutation(n_db)  # shards in arbitrary order: the ranking must not care
    (tmp_path / "codes").mkdir()
    for f, part in enumerate(np.array_split(perm, 3)):
        pq.write_table(codes_table(db_ids[part], db_codes[part], code_shard_meta(BITS, "m", "image")),
                       tmp_path / "codes" / f"part-{f}.parquet")
    build_index(str(tmp_path / "codes"), str(tmp_path / "idx"), IndexConfig(shard_size=250), use_ray=False)
    index = ShardedIndex.open(str(tmp_path / "idx"))
    table = LabelTable.read(str(tmp_path / "data"))

    def multihot(ids):
        out = np.zeros((len(ids), C), dtype=np.float32)
        for r, i in enumerate(ids):
            out[r, labels[int(i)]] = 1
        return out

    for k in (1, 7, 50, 1000):  # 1000 > N: the whole database
        got = index_retrieval_metrics(index, q_codes, q_ids, table, map_topk=k, ndcg_k=k,
                                      precision_k=(1, k), batch_size=16)
        ref = retrieval_metrics(unpack_codes(q_codes), unpack_codes(db_codes), multihot(q_ids),
                                multihot(db_ids), map_topk=k, ndcg_k=k, precision_k=(1, k))
        assert got.keys() == ref.keys()
        for name in ref:
            assert got[name] == pytest.approx(ref[name], abs=1e-12), (k, name)

    # An index that holds query rows is refused: it would rank queries against themselves.
    with pytest.raises(ValueError, match="not in the database splits"):
        index_retrieval_metrics(index, q_codes, q_ids, table, map_topk=5, db_splits=("train",))


# --------------------------------------------------------------------------------------------
# A long-running server: parallel opening, checksums verified once per build, memory-mapped
# shards, close(), concurrent searches with per-call nprobe


@pytest.fixture
def hash_calls(monkeypatch) -> list[str]:
    """The paths search.py hashes, in call order."""
    calls: list[str] = []
    real = search_mod.sha256_stream

    def counting(fs, path, copy_to=None):
        calls.append(path)
        return real(fs, path, copy_to=copy_to)

    monkeypatch.setattr(search_mod, "sha256_stream", counting)
    return calls


def _shard_files(index_dir: str) -> list[str]:
    m = json.loads(Path(index_dir, "manifest.json").read_text())
    return [os.path.join(index_dir, s["uri"]) for s in m["shards"]]


def _mapped_files() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}


@pytest.mark.parametrize("t", ["flat", "ivf", "multihash"])
def test_parallel_open_equals_sequential(code_dir, built, t):
    import faiss

    _, ids, codes = code_dir
    one = ShardedIndex.open(built[t], threads=1)
    many = ShardedIndex.open(built[t], threads=3)
    assert len(one._shards()) == len(many._shards()) == 3
    for a, b in zip(one._shards(), many._shards()):  # the same shards, in the manifest's order
        assert np.array_equal(faiss.serialize_index_binary(a), faiss.serialize_index_binary(b))
    q = queries()
    for x, y in zip(one.search(q, 10), many.search(q, 10)):
        assert np.array_equal(x, y)
    if t == "flat":
        assert_knn_tie_aware(*many.search(q, 10), q, codes, ids, 10)


def test_shards_are_opened_side_by_side(built, monkeypatch):
    """All three shard loads are in flight at once: one-by-one opening would never pass the
    barrier (BrokenBarrierError after its timeout)."""
    barrier = threading.Barrier(3, timeout=60)
    real = search_mod._load_shard

    def load(*a, **kw):
        barrier.wait()
        return real(*a, **kw)

    monkeypatch.setattr(search_mod, "_load_shard", load)
    with ShardedIndex.open(built["flat"], threads=3) as index:
        assert index.search(queries(4), 3)[0].shape == (4, 3)


def test_parallel_open_names_the_first_bad_shard(built, tmp_path):
    d = _copy_index(built["flat"], tmp_path / "idx")
    for shard in _shard_files(d)[1:]:
        data = bytearray(Path(shard).read_bytes())
        data[len(data) // 2] ^= 0xFF
        Path(shard).write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"shard 1 .*sha256 .* does not match"):
        ShardedIndex.open(d, threads=3)


# --------------------------------------------------------------------------------------------
# Checksums: always / once / never


def test_verify_once_hashes_each_build_once(code_dir, tmp_path, hash_calls):
    root, _, _ = code_dir
    d, cache = str(tmp_path / "idx"), str(tmp_path / "cache")
    m1 = build_index(root, d, IndexConfig(shard_size=700), use_ray=False)
    shards = _shard_files(d)
    q = queries()

    def opened(**kw) -> int:
        """Open, check the answers, return how many shards were hashed."""
        before = len(hash_calls)
        with ShardedIndex.open(d, cache_dir=cache, **kw) as index:
            assert np.array_equal(index.search(q, 10)[0], ref_D)
        return len(hash_calls) - before

    ref_D = ShardedIndex.open(d).search(q, 10)[0]
    hash_calls.clear()
    assert opened(verify="once") == 3  # first open: everything hashed, then recorded
    records = os.listdir(os.path.join(cache, "verified"))
    assert len(records) == 1 and records[0].startswith(f"{m1.build_id}.")
    assert opened(verify="once") == 0  # a restarted replica: the same build, unchanged files
    assert opened(verify="once", threads=1) == 0
    assert opened(verify="always") == 3 and opened(verify="never") == 0
    assert opened() == 3  # "always" is the default

    # A shard touched (or rewritten, replaced) since: that shard alone is hashed again.
    st = os.stat(shards[1])
    os.utime(shards[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert opened(verify="once") == 1 and hash_calls[-1] == shards[1]
    assert opened(verify="once") == 0

    # Corrupted through the filesystem, same size: the record no longer matches, so it is hashed
    # and refused, and nothing new is recorded.
    good = Path(shards[2]).read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    Path(shards[2]).write_bytes(bytes(bad))
    with pytest.raises(ManifestError, match=r"shard 2 .*sha256 .* does not match"):
        ShardedIndex.open(d, cache_dir=cache, verify="once")
    Path(shards[2]).write_bytes(good)
    assert opened(verify="once") == 1
    assert opened(verify="once") == 0

    # A changed manifest has no record: everything is hashed again.
    path = Path(d, "manifest.json")
    original = path.read_text()
    man = json.loads(original)
    man["extra"]["note"] = "edited"
    path.write_text(json.dumps(man))
    assert opened(verify="once") == 3 and opened(verify="once") == 0
    path.write_text(original)
    assert opened(verify="once") == 0  # the first manifest's record still holds

    # A new build: new shards, new record.
    m2 = build_index(root, d, IndexConfig(shard_size=700), use_ray=False)
    assert m2.build_id != m1.build_id
    assert opened(verify="once") == 3 and opened(verify="once") == 0
    assert sum(r.startswith(f"{m2.build_id}.") for r in os.listdir(os.path.join(cache, "verified"))) == 1

    # The same build copied elsewhere: other files, other record.
    d2 = _copy_index(d, tmp_path / "copy")
    before = len(hash_calls)
    ShardedIndex.open(d2, cache_dir=cache, verify="once").close()
    assert len(hash_calls) - before == 3


def test_verify_once_with_an_unwritable_cache_still_opens(built, tmp_path, hash_calls, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache directory should be
    with caplog.at_level("WARNING", logger="dcgh_dist.index.search"):
        for _ in range(2):
            ShardedIndex.open(built["flat"], cache_dir=str(blocker), verify="once").close()
    assert len(hash_calls) == 6 and "cannot record the verification" in caplog.text


def test_remote_shards_are_cached_mapped_and_verified_once(code_dir, built, tmp_path, monkeypatch,
                                                           hash_calls):
    """Shards on a filesystem that is not local (as S3 is) go through the download cache: hashed
    on the way, memory-mapped from the cache, and with "once" not hashed again; a cached copy
    corrupted since is hashed, dropped and fetched again."""
    _, ids, codes = code_dir
    sub = pafs.SubTreeFileSystem("/", pafs.LocalFileSystem())  # local files, not LocalFileSystem
    monkeypatch.setattr(search_mod, "resolve_filesystem", lambda uri, endpoint=None: (sub, uri.lstrip("/")))
    cache = tmp_path / "cache"
    q = queries()
    with ShardedIndex.open(built["flat"], cache_dir=str(cache), verify="once") as index:
        assert index.mmapped == [True] * 3
        assert_knn_tie_aware(*index.search(q, 10), q, codes, ids, 10)
    assert len(hash_calls) == 3  # the downloads
    copies = sorted(cache.glob("*.faissindex"))
    assert len(copies) == 3 and (cache / "verified").is_dir()
    ShardedIndex.open(built["flat"], cache_dir=str(cache), verify="once").close()
    assert len(hash_calls) == 3
    ShardedIndex.open(built["flat"], cache_dir=str(cache), verify="always").close()
    assert len(hash_calls) == 6  # the cached copies

    data = bytearray(copies[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    copies[0].write_bytes(bytes(data))
    with ShardedIndex.open(built["flat"], cache_dir=str(cache), verify="once") as index:
        assert_knn_tie_aware(*index.search(q, 10), q, codes, ids, 10)
    assert len(hash_calls) == 8  # the bad copy, then its new download
    assert sorted(cache.glob("*.faissindex")) == copies and not list(cache.glob("*.part-*"))


def test_bad_options_are_refused(built):
    with pytest.raises(ValueError, match=r"verify must be one of \['always', 'once', 'never'\], got True"):
        ShardedIndex.open(built["flat"], verify=True)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        ShardedIndex.open(built["flat"], threads=0)
    with pytest.raises(ValueError, match="nprobe applies to ivf indexes, this one is flat"):
        ShardedIndex.open(built["flat"], nprobe=4)
    with pytest.raises(ValueError, match="nprobe must be an integer from 1 to nlist = 16, got 17"):
        ShardedIndex.open(built["ivf"], nprobe=17)


# --------------------------------------------------------------------------------------------
# Memory mapping


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
@pytest.mark.parametrize("t", ["flat", "ivf", "multihash"])
def test_shards_are_memory_mapped_until_closed(built, tmp_path, t):
    d = _copy_index(built[t], tmp_path / "idx")  # paths no other test's index maps
    shards = {os.path.abspath(p) for p in _shard_files(d)}
    index = ShardedIndex.open(d)
    assert index.mmapped == [True] * 3 and shards <= _mapped_files()
    index.close()
    assert not shards & _mapped_files()
    plain = ShardedIndex.open(d, mmap=False)
    assert plain.mmapped == [False] * 3 and not shards & _mapped_files()


def test_a_shard_faiss_cannot_map_is_read_into_memory(code_dir, built, monkeypatch, caplog):
    import faiss

    _, ids, codes = code_dir
    real = faiss.read_index_binary

    def no_mmap(path, flags=0):
        if flags & faiss.IO_FLAG_MMAP_IFC:
            raise RuntimeError("Error in read_index_binary: mmap not supported here")
        return real(path, flags)

    monkeypatch.setattr(faiss, "read_index_binary", no_mmap)
    with caplog.at_level("WARNING", logger="dcgh_dist.index.search"):
        index = ShardedIndex.open(built["flat"])
    assert index.mmapped == [False] * 3 and "cannot read it memory-mapped (Error in" in caplog.text
    q = queries()
    assert_knn_tie_aware(*index.search(q, 10), q, codes, ids, 10)


# --------------------------------------------------------------------------------------------
# close()


def test_closed_index_refuses_searches(built):
    q = queries(8)
    with ShardedIndex.open(built["ivf"], threads=3) as index:
        index.search(q[:2], 5)  # the thread-pool path
        pool_threads = list(index._pool._threads)  # the executor's worker threads
    assert pool_threads and not any(t.is_alive() for t in pool_threads)
    for call in (lambda: index.search(q, 5), lambda: index.search_stable(q, 5),
                 lambda: index.range_search(q, 3), lambda: index.search(q, 5, nprobe=2)):
        with pytest.raises(IndexClosedError, match="was closed; open it again"):
            call()
    index.close()  # twice is fine
    assert len(index) == 2000 and index.manifest.build_id  # what it describes stays readable


def test_close_during_searches(built):
    """Searches running when close() comes finish with full answers or raise IndexClosedError:
    never another error, never a partial answer."""
    index = ShardedIndex.open(built["flat"], threads=3)
    q = queries()
    ref = {n: index.search(q[:n], 10)[0] for n in (2, 60)}
    started, errors, bad = threading.Barrier(5, timeout=60), [], []

    def run(n):
        started.wait()
        try:
            while True:
                if not np.array_equal(index.search(q[:n], 10)[0], ref[n]):
                    bad.append(n)
        except IndexClosedError:
            pass
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in (2, 2, 60, 60)]
    for t in threads:
        t.start()
    started.wait()
    index.close()
    for t in threads:
        t.join(60)
    assert not errors and not bad and not any(t.is_alive() for t in threads)


# --------------------------------------------------------------------------------------------
# Concurrent searches, per-call nprobe


def test_concurrent_searches_with_different_nprobe_equal_sequential_ones(built):
    index = ShardedIndex.open(built["ivf"], threads=3)
    assert index.nprobe == 4  # the manifest's
    q = queries()
    nprobes = (1, 2, 4, 16)

    def answers(nprobe):
        return [*index.search(q, 10, nprobe=nprobe),  # many queries: shards one after another
                *index.search(q[:3], 10, nprobe=nprobe),  # few: shards side by side in the pool
                *index.range_search(q, 12, nprobe=nprobe),
                *index.search_stable(q, 10, nprobe=nprobe, margin=0)]

    ref = {n: answers(n) for n in nprobes}
    assert not np.array_equal(ref[1][0], ref[16][0])  # nprobe matters here
    assert ref[1][4][-1] < ref[16][4][-1]  # range search finds more with more lists probed
    assert all(np.array_equal(a, b) for a, b in zip(answers(None), ref[4]))

    start, failures = threading.Barrier(8, timeout=60), []

    def run(worker):
        nprobe = nprobes[worker % len(nprobes)]
        start.wait()
        for _ in range(5):
            got = answers(nprobe)
            if not all(np.array_equal(a, b) for a, b in zip(got, ref[nprobe])):
                failures.append(nprobe)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not failures and not any(t.is_alive() for t in threads)
    # The default is still the manifest's: no call changed what the index holds.
    assert all(np.array_equal(a, b) for a, b in zip(answers(None), ref[4]))


def test_nprobe_per_call_is_validated_and_open_sets_the_default(built):
    q = queries(6)
    flat = ShardedIndex.open(built["flat"])
    assert flat.nprobe is None
    with pytest.raises(ValueError, match="nprobe applies to ivf indexes"):
        flat.search(q, 3, nprobe=4)
    with pytest.raises(ValueError, match="nprobe applies to ivf indexes"):
        flat.range_search(q, 3, nprobe=4)
    ivf = ShardedIndex.open(built["ivf"], nprobe=2)
    assert ivf.nprobe == 2
    for a, b in zip(ivf.search(q, 5), ivf.search(q, 5, nprobe=2)):
        assert np.array_equal(a, b)
    for bad in (0, 17, 2.5, True, "4"):
        with pytest.raises(ValueError, match="nprobe must be an integer from 1 to nlist = 16"):
            ivf.search(q, 5, nprobe=bad)
    with pytest.raises(ValueError, match="nprobe must be an integer"):
        ivf.search_stable(q, 5, nprobe=0)
