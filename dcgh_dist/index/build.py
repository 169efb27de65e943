"""Code shards (Parquet ``id`` + ``code``) -> sharded FAISS binary indexes + a manifest.

Shards are cut by row count (``IndexConfig.shard_size``) over the code files in path order and
built in parallel as Ray tasks (or in-process with ``use_ray=False``). Each task reads its slices,
sorts them by id, builds one FAISS index, serialises it, checksums the bytes and writes them
(local disk or S3, one code path). The driver writes the manifest last, atomically, so a reader
never sees a manifest naming a missing shard. Shards of one build live under
``shards/<build_id>/``: a rebuild never overwrites the shards an older manifest points to. The
manifest lists the builds whose shards are kept (``retained_builds``, at most
``IndexConfig.keep_builds``, newest first); after the new manifest is in place, a rebuild deletes
the directories of the builds that fall off that list, and nothing else.

One build at a time: a lock file on local filesystems (:mod:`dcgh_dist.index.lock`), and, on every
filesystem, a re-read of the manifest just before commit that refuses to overwrite a manifest
another build wrote meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dcgh_dist.data.format import first_duplicate, list_data_files, overlapping_ranges
from dcgh_dist.index.codes import read_code_meta, read_code_shard
from dcgh_dist.index.lock import build_lock
from dcgh_dist.storage import display, join, resolve_filesystem, write_bytes_atomic
from dcgh_dist.index.manifest import (
    BuildConflictError,
    IndexConfig,
    IndexManifest,
    ManifestError,
    ShardEntry,
    check_build_id,
    manifest_location,
    read_manifest,
    write_manifest,
)

logger = logging.getLogger(__name__)

SHARD_SUFFIX = ".faissindex"


@dataclass(frozen=True)
class CodeFile:
    path: str  # as the filesystem names it
    rows: int


@dataclass
class CodeSource:
    """What the code shards under a URI hold, from their Parquet footers (no codes read)."""

    uri: str
    files: list[CodeFile]
    bits: int
    model_fingerprint: str | None
    modality: str | None
    config: dict[str, Any] | None

    @property
    def num_rows(self) -> int:
        return sum(f.rows for f in self.files)


def scan_code_source(uri: str, s3_endpoint: str | None = None) -> CodeSource:
    """List the code shards under ``uri`` and check they agree on bit width and model."""
    from dcgh_dist.data.format import DatasetError

    fs, root = resolve_filesystem(uri, s3_endpoint)
    if root.endswith(".parquet"):
        paths = [root]
    else:
        try:
            paths = list_data_files(uri, s3_endpoint)
        except DatasetError as e:
            raise ValueError(f"{uri}: no code shards (*.parquet) found") from e
    if fs.get_file_info(join(root, "encode.json")).type == pafs.FileType.File:
        raise ValueError(
            f"{uri} is the root of an encoding run; pass its modality directory "
            f"({uri.rstrip('/')}/image or {uri.rstrip('/')}/text) as --codes"
        )

    def footer(path: str):
        where = display(fs, path)
        try:
            pf = pq.ParquetFile(path, filesystem=fs)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            raise ValueError(f"{where}: cannot read Parquet footer ({e})") from e
        schema = pf.schema_arrow
        if "id" not in schema.names or "code" not in schema.names:
            raise ValueError(f"{where}: not a code shard: needs columns 'id' and 'code', has {schema.names}")
        t = schema.field("code").type
        width = t.byte_width if pa.types.is_fixed_size_binary(t) else None
        meta = read_code_meta(fs, path)
        return path, pf.metadata.num_rows, width, meta, where

    with ThreadPoolExecutor(16) as pool:
        footers = list(pool.map(footer, paths))

    widths = {w for _, n, w, meta, _ in footers if w}
    for _, _, w, meta, where in footers:
        if meta and meta.get("bits") and w and meta["bits"] != w * 8:
            raise ValueError(f"{where}: metadata says {meta['bits']} bits but codes are {w * 8} bits wide")
    metas = [meta for _, _, _, meta, _ in footers if meta]
    meta_bits = {m["bits"] for m in metas if m.get("bits")}
    all_bits = {w * 8 for w in widths} | meta_bits
    if len(all_bits) > 1:
        raise ValueError(f"{uri}: code shards have different bit widths {sorted(all_bits)}")
    if not all_bits:
        # Only variable-width binary columns without metadata: read one shard to see the width.
        _, codes = read_code_shard(fs, paths[0])
        all_bits = {codes.shape[1] * 8}
    bits = all_bits.pop()
    fps = {m.get("model_fingerprint") for m in metas}
    if len(fps) > 1:
        raise ValueError(
            f"{uri}: code shards come from different models (fingerprints {sorted(map(str, fps))})"
        )
    fingerprint = fps.pop() if fps else None
    if metas and len(metas) < len(footers):
        raise ValueError(
            f"{uri}: {len(footers) - len(metas)} code shard(s) lack the dcgh.codes metadata others "
            "carry; they may come from another run"
        )
    mods = {m.get("modality") for m in metas}
    return CodeSource(
        uri=uri,
        files=[CodeFile(p, n) for p, n, *_ in footers],
        bits=bits,
        model_fingerprint=fingerprint,
        modality=mods.pop() if len(mods) == 1 else None,
        config=metas[0].get("config") if metas else None,
    )


def plan_shards(files: Sequence[CodeFile], shard_size: int) -> list[list[tuple[str, int, int]]]:
    """Cut the concatenated rows into shards of ``shard_size``: per shard (path, start, stop)."""
    shards: list[list[tuple[str, int, int]]] = []
    cur: list[tuple[str, int, int]] = []
    room = shard_size
    for f in files:
        start = 0
        while start < f.rows:
            take = min(room, f.rows - start)
            cur.append((f.path, start, start + take))
            start += take
            room -= take
            if room == 0:
                shards.append(cur)
                cur, room = [], shard_size
    if cur:
        shards.append(cur)
    return shards


def read_slices(
    uri: str, slices: Sequence[tuple[str, int, int]], s3_endpoint: str | None, columns=("id", "code")
) -> tuple[np.ndarray, np.ndarray | None]:
    fs, _ = resolve_filesystem(uri, s3_endpoint)
    ids, codes = [], []
    for path, start, stop in slices:
        where = display(fs, path)
        if "code" in columns:
            i, c = read_code_shard(fs, path, where)
            codes.append(c[start:stop])
        else:
            i = pq.read_table(path, filesystem=fs, columns=["id"]).column("id").to_numpy()
        ids.append(np.asarray(i[start:stop], dtype=np.int64))
    return np.concatenate(ids), (np.concatenate(codes) if codes else None)


# --------------------------------------------------------------------------------------------
# FAISS index construction


def new_index(cfg: IndexConfig, bits: int, id_layout: str, trained: bytes | None = None):
    """An empty FAISS binary index of the configured type (trained for IVF)."""
    import faiss

    if cfg.index_type == "ivf":
        if trained is None:
            raise ValueError("an IVF index needs a trained quantizer")
        return faiss.deserialize_index_binary(np.frombuffer(trained, dtype=np.uint8))
    if cfg.index_type == "flat":
        base = faiss.IndexBinaryFlat(bits)
    else:
        nhash, b, nflip = cfg.multihash_params(bits)
        base = faiss.IndexBinaryMultiHash(bits, nhash, b)
        base.nflip = nflip
    return base if id_layout == "offset" else faiss.IndexBinaryIDMap(base)


def train_ivf(sample: np.ndarray, bits: int, cfg: IndexConfig) -> bytes:
    """Train the IVF quantizer once on a sample; every shard starts from this trained index."""
    import faiss

    if len(sample) < cfg.nlist:
        raise ValueError(
            f"ivf: {len(sample)} training codes for nlist={cfg.nlist}; lower index nlist "
            "(FAISS needs at least one code per list, ideally >= 39)"
        )
    index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(bits), bits, cfg.nlist)
    index.cp.seed = cfg.seed
    index.nprobe = cfg.nprobe
    t0 = time.time()
    index.train(np.ascontiguousarray(sample))
    logger.info("trained IVF quantizer (nlist=%d) on %d codes in %.1fs", cfg.nlist, len(sample), time.time() - t0)
    return faiss.serialize_index_binary(index).tobytes()


def sample_codes(uri: str, source: CodeSource, n: int, seed: int, s3_endpoint: str | None) -> np.ndarray:
    """About ``n`` codes drawn uniformly from up to 64 files spread evenly over the source."""
    rng = np.random.default_rng(seed)
    files = source.files
    if len(files) > 64:
        files = [files[i] for i in np.linspace(0, len(files) - 1, 64).round().astype(int)]
    total = sum(f.rows for f in files)
    fs, _ = resolve_filesystem(uri, s3_endpoint)
    parts = []
    for f in files:
        if not f.rows:
            continue
        _, codes = read_code_shard(fs, f.path)
        take = min(f.rows, max(1, round(n * f.rows / total)))
        parts.append(codes[rng.choice(f.rows, take, replace=False)])
    return np.concatenate(parts)


@contextlib.contextmanager
def omp_threads(n: int | None) -> Iterator[None]:
    """FAISS's OpenMP thread count set to ``n`` for the block (None: unchanged), then restored.

    The count belongs to the calling thread (OpenMP keeps one per thread). A build that left it
    at a Ray task's 1 made every later ``ShardedIndex.open`` from that thread (threads default to
    FAISS's count) scan its shards one after another: bench_serve's in-process baseline, built
    and opened from the main thread.
    """
    import faiss

    previous = faiss.omp_get_max_threads()
    if n:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def build_shard(
    uri: str,
    slices: Sequence[tuple[str, int, int]],
    bits: int,
    cfg: IndexConfig,
    out_uri: str,
    rel_uri: str,
    *,
    trained: bytes | None = None,
    s3_endpoint: str | None = None,
    threads: int | None = None,
) -> ShardEntry:
    """Read one shard's codes, build its index, write it to ``out_uri``; return its entry.

    ``threads``: FAISS's OpenMP threads for this build (a Ray task's CPUs); None: the caller's.
    """
    import hashlib

    import faiss

    ids, codes = read_slices(uri, slices, s3_endpoint)
    if codes.shape[1] * 8 != bits:
        raise ValueError(f"{slices[0][0]}: codes are {codes.shape[1] * 8} bits, expected {bits}")
    order = np.argsort(ids, kind="stable")
    ids, codes = ids[order], np.ascontiguousarray(codes[order])
    dup = np.flatnonzero(ids[1:] == ids[:-1])
    if dup.size:
        raise ValueError(
            f"id {ids[dup[0]]} appears more than once in the code shards {[s[0] for s in slices]}; "
            "ids must be unique"
        )
    n = len(ids)
    contiguous = n > 0 and int(ids[-1]) - int(ids[0]) + 1 == n
    # IVF keeps ids in its inverted lists anyway; flat/multihash skip 8 bytes/item when the ids
    # are a contiguous range (the manifest's offset recovers them).
    layout = "offset" if contiguous and cfg.index_type != "ivf" else "ids"
    with omp_threads(threads):
        index = new_index(cfg, bits, layout, trained)
        if layout == "offset":
            index.add(codes)
        else:
            index.add_with_ids(codes, ids)
        blob = faiss.serialize_index_binary(index)
        del index
    digest = hashlib.sha256(memoryview(blob)).hexdigest()
    fs, path = resolve_filesystem(out_uri, s3_endpoint)
    write_bytes_atomic(fs, path, memoryview(blob))
    return ShardEntry(
        uri=rel_uri, rows=n, id_min=int(ids[0]) if n else 0, id_max=int(ids[-1]) if n else -1,
        id_layout=layout, id_offset=int(ids[0]) if layout == "offset" else None,
        sha256=digest, bytes=int(blob.size),
    )


def _build_shard_task(*args, **kwargs) -> ShardEntry:
    return build_shard(*args, **kwargs)


def build_index(
    codes_uri: str,
    output_uri: str,
    cfg: IndexConfig,
    *,
    expected_fingerprint: str | None = None,
    config: dict[str, Any] | None = None,
    s3_endpoint: str | None = None,
    use_ray: bool = True,
) -> IndexManifest:
    """Build the sharded index of the code shards under ``codes_uri`` into ``output_uri``.

    ``expected_fingerprint`` (from ``--checkpoint``) must match the shards' own fingerprint when
    they carry one; shards without metadata take it as theirs. Returns the written manifest.
    Refuses (``BuildConflictError``) to run while another build holds the output's lock, and to
    commit when another build wrote the manifest while this one ran.
    """
    build_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    man_uri = manifest_location(output_uri)
    base = man_uri.rsplit("/", 1)[0]
    fs, base_path = resolve_filesystem(base, s3_endpoint)
    if isinstance(fs, pafs.LocalFileSystem):
        lock = build_lock(base_path, build_id, base)
    else:
        logger.info("%s: no build lock on this filesystem; the manifest is checked before commit", base)
        lock = contextlib.nullcontext()
    with lock:
        return _build_locked(codes_uri, man_uri, build_id, cfg, expected_fingerprint=expected_fingerprint,
                             config=config, s3_endpoint=s3_endpoint, use_ray=use_ray)


def _read_current(man_uri: str, s3_endpoint: str | None) -> IndexManifest | None:
    """The manifest now at ``man_uri``, None where there is none (ManifestError if unreadable)."""
    fs, path = resolve_filesystem(man_uri, s3_endpoint)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    return read_manifest(man_uri, s3_endpoint)


def _build_locked(
    codes_uri: str,
    man_uri: str,
    build_id: str,
    cfg: IndexConfig,
    *,
    expected_fingerprint: str | None,
    config: dict[str, Any] | None,
    s3_endpoint: str | None,
    use_ray: bool,
) -> IndexManifest:
    t0 = time.time()
    base = man_uri.rsplit("/", 1)[0]
    try:
        previous = _read_current(man_uri, s3_endpoint)
    except ManifestError as e:
        # Replacing it would lose track of the shards it names, and trust nothing it says.
        raise ManifestError(
            f"{e}. A rebuild would replace this manifest: fix or remove it (and the shards it "
            "names), or build into another --output"
        ) from e
    source = scan_code_source(codes_uri, s3_endpoint)
    if source.num_rows == 0:
        raise ValueError(f"{codes_uri}: the code shards hold no rows")
    fingerprint = source.model_fingerprint
    if expected_fingerprint is not None:
        if fingerprint is not None and fingerprint != expected_fingerprint:
            raise ManifestError(
                f"{codes_uri}: codes were made by model {fingerprint}, but the checkpoint given is "
                f"{expected_fingerprint}; re-encode with that checkpoint or drop --checkpoint"
            )
        fingerprint = expected_fingerprint
    if fingerprint is None:
        logger.warning("%s: codes carry no model fingerprint; the manifest will not pin a model", codes_uri)
    bits = source.bits
    if cfg.index_type == "multihash":
        cfg.multihash_params(bits)  # fail before any work if they don't fit

    trained = None
    if cfg.index_type == "ivf":
        n_train = min(source.num_rows, cfg.train_size or 64 * cfg.nlist)
        sample = sample_codes(codes_uri, source, n_train, cfg.seed, s3_endpoint)
        trained = train_ivf(sample, bits, cfg)

    plan = plan_shards(source.files, cfg.shard_size)
    rels = [f"shards/{build_id}/shard-{i:05d}{SHARD_SUFFIX}" for i in range(len(plan))]
    logger.info("building %d %s shard(s) of <= %d codes (%d bits) from %d rows",
                len(plan), cfg.index_type, cfg.shard_size, bits, source.num_rows)
    threads = max(1, int(cfg.task_cpus))
    args = [(codes_uri, sl, bits, cfg, join(base, rel), rel) for sl, rel in zip(plan, rels)]
    # task_cpus sizes Ray tasks; an in-process build keeps the process's own FAISS threads.
    kw = dict(trained=trained, s3_endpoint=s3_endpoint, threads=threads if use_ray else None)
    if use_ray:
        import ray

        task = ray.remote(num_cpus=cfg.task_cpus, max_retries=2)(_build_shard_task)
        trained_ref = ray.put(trained) if trained is not None else None
        refs = [task.remote(*a, **{**kw, "trained": trained_ref}) for a in args]
        entries = []
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            entries.append(ray.get(done[0]))
            logger.info("index shards built: %d/%d", len(entries), len(refs))
        by_uri = {e.uri: e for e in entries}
        entries = [by_uri[r] for r in rels]
    else:
        entries = [build_shard(*a, **kw) for a in args]

    _check_ids_unique_across(codes_uri, plan, entries, s3_endpoint)
    chain = [build_id, *(b for b in (previous.retained_builds if previous else []) if b != build_id)]
    manifest = IndexManifest(
        bits=bits, index=cfg, shards=entries, model_fingerprint=fingerprint,
        modality=source.modality, config=config if config is not None else source.config,
        codes_uri=codes_uri, build_id=build_id, retained_builds=chain[:cfg.keep_builds],
        extra={"build_seconds": round(time.time() - t0, 3)},
    )
    _check_unchanged(man_uri, previous, build_id, s3_endpoint)
    write_manifest(man_uri, manifest, s3_endpoint)
    for old in chain[cfg.keep_builds:]:
        _remove_build(base, old, s3_endpoint)
    logger.info("wrote %s: %d shards, %d codes, %.1fs", man_uri, len(entries), manifest.num_items,
                time.time() - t0)
    return manifest


def _check_unchanged(
    man_uri: str, previous: IndexManifest | None, build_id: str, s3_endpoint: str | None
) -> None:
    """Refuse to commit over a manifest another build wrote while this one ran (the only guard
    where there is no lock, S3; a second one where there is)."""
    try:
        current = _read_current(man_uri, s3_endpoint)
    except ManifestError as e:
        raise BuildConflictError(
            f"{man_uri}: the manifest changed while build {build_id} ran and cannot be read now "
            f"({e}); not overwriting it. This build's shards stay under shards/{build_id}/"
        ) from e
    before = previous.build_id if previous else None
    now = current.build_id if current else None
    if now != before:
        other = (f"build {now} (created {current.created})" if current
                 else f"the removal of build {before}'s manifest")
        raise BuildConflictError(
            f"{man_uri}: another build committed while build {build_id} ran: {other}; not "
            f"overwriting it. This build's shards stay under shards/{build_id}/ (remove them, or "
            "rebuild once the other build is done)"
        )


def _remove_build(base: str, build_id: str, s3_endpoint: str | None) -> None:
    """Delete ``base/shards/<build_id>/``, a build this index's own manifests recorded."""
    check_build_id(build_id, base)  # one component: a direct child of shards/, nothing else
    fs, path = resolve_filesystem(join(base, "shards", build_id), s3_endpoint)
    try:
        fs.delete_dir(path)
        logger.info("removed the shards of build %s (beyond keep_builds)", build_id)
    except FileNotFoundError:
        pass  # removed by hand, or never written
    except OSError as e:
        logger.warning("could not remove the shards of build %s at %s: %s", build_id, path, e)


def _check_ids_unique_across(
    uri: str, plan: list, entries: list[ShardEntry], s3_endpoint: str | None
) -> None:
    """Shards are unique inside; across shards, ids can only collide where id ranges overlap,
    so only those shards' ids are read back and compared."""
    overlapping = overlapping_ranges([(e.id_min, e.id_max) if e.rows else None for e in entries])
    if not overlapping:
        return
    ids = np.concatenate([read_slices(uri, plan[i], s3_endpoint, columns=("id",))[0] for i in overlapping])
    if dup := first_duplicate(ids):
        raise ValueError(f"{uri}: id {dup[0]} appears {dup[1]} times in the code shards; ids must be unique")
