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
import dataclasses
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
from dcgh_dist.data.labels import LabelTable
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
    version_manifest_name,
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
    relaxed: bool = False  # every shard carries the relaxed codes (encode --relaxed)

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
        return path, pf.metadata.num_rows, width, meta, where, "relaxed" in schema.names

    with ThreadPoolExecutor(16) as pool:
        footers = list(pool.map(footer, paths))

    with_relaxed = [f[5] for f in footers]
    if any(with_relaxed) and not all(with_relaxed):
        where = footers[with_relaxed.index(False)][4]
        raise ValueError(f"{uri}: some code shards carry relaxed codes and some do not ({where} does not); "
                         "encode them all with --relaxed, or none")
    footers = [f[:5] for f in footers]
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
        relaxed=all(with_relaxed),
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


def read_relaxed_slices(uri: str, slices: Sequence[tuple[str, int, int]], s3_endpoint: str | None) -> np.ndarray:
    """The relaxed codes of ``slices``, in the order :func:`read_slices` gives their rows."""
    from dcgh_dist.index.codes import read_relaxed

    fs, _ = resolve_filesystem(uri, s3_endpoint)
    return np.concatenate([read_relaxed(fs, path, display(fs, path))[start:stop] for path, start, stop in slices])


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
    labels: LabelTable | None = None,
    relaxed: bool = False,
) -> ShardEntry:
    """Read one shard's codes, build its index, write it to ``out_uri``; return its entry.

    ``threads``: FAISS's OpenMP threads for this build (a Ray task's CPUs); None: the caller's.
    ``labels``: the dataset's labels, written beside the shard for filtered search. ``relaxed``:
    the code shards' relaxed codes are written beside it too, for re-ranking.
    """
    ids, codes = read_slices(uri, slices, s3_endpoint)
    if codes.shape[1] * 8 != bits:
        raise ValueError(f"{slices[0][0]}: codes are {codes.shape[1] * 8} bits, expected {bits}")
    return write_shard(ids, codes, bits, cfg, out_uri, rel_uri, trained=trained, s3_endpoint=s3_endpoint,
                       threads=threads, labels=labels, where=str([s[0] for s in slices]),
                       relaxed=read_relaxed_slices(uri, slices, s3_endpoint) if relaxed else None)


def write_shard(
    ids: np.ndarray, codes: np.ndarray, bits: int, cfg: IndexConfig, out_uri: str, rel_uri: str, *,
    trained: bytes | None = None, s3_endpoint: str | None = None, threads: int | None = None,
    labels: LabelTable | np.ndarray | None = None, where: str = "", relaxed: np.ndarray | None = None,
) -> ShardEntry:
    """Index ``(ids, codes)`` (any order; sorted here) as one shard at ``out_uri``, with its labels
    file beside it when ``labels`` is given (a :class:`LabelTable` to look the ids up in, or the
    packed rows of ``ids`` themselves), and its relaxed codes (rows of ``ids``) when given."""
    import hashlib

    import faiss

    order = np.argsort(ids, kind="stable")
    ids, codes = np.asarray(ids, np.int64)[order], np.ascontiguousarray(codes[order])
    dup = np.flatnonzero(ids[1:] == ids[:-1])
    if dup.size:
        raise ValueError(f"id {ids[dup[0]]} appears more than once in the code shards {where}; ids must be unique")
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
    entry = ShardEntry(
        uri=rel_uri, rows=n, id_min=int(ids[0]) if n else 0, id_max=int(ids[-1]) if n else -1,
        id_layout=layout, id_offset=int(ids[0]) if layout == "offset" else None,
        sha256=digest, bytes=int(blob.size),
    )
    if labels is not None:
        if isinstance(labels, LabelTable):
            rows = labels.packed[labels.positions(ids, f"{where}: id")]
        else:
            rows = np.asarray(labels)[order]
        entry.labels = write_side_file(side_uri(out_uri, "labels"), side_uri(rel_uri, "labels"), rows, s3_endpoint)
    if relaxed is not None:
        entry.relaxed = write_side_file(side_uri(out_uri, "relaxed"), side_uri(rel_uri, "relaxed"),
                                        np.asarray(relaxed, dtype=np.float16)[order], s3_endpoint)
    return entry


def side_uri(shard_uri: str, kind: str) -> str:
    """``.../shard-00003.faissindex`` -> ``.../<kind>-00003.npy`` (tombstones, labels)."""
    head, name = shard_uri.rsplit("/", 1)
    return f"{head}/{kind}-{name.removeprefix('shard-').removesuffix(SHARD_SUFFIX)}.npy"


def write_side_file(uri: str, rel_uri: str, array: np.ndarray, s3_endpoint: str | None, **fields) -> dict:
    """Write ``array`` as a .npy beside a shard; its manifest record (uri, sha256, bytes, ...)."""
    import hashlib
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    data = buf.getvalue()
    fs, path = resolve_filesystem(uri, s3_endpoint)
    write_bytes_atomic(fs, path, data)
    return {"uri": rel_uri, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), **fields}


def _build_shard_task(*args, **kwargs) -> ShardEntry:
    return build_shard(*args, **kwargs)


def new_build_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


@contextlib.contextmanager
def index_lock(man_uri: str, build_id: str, s3_endpoint: str | None) -> Iterator[None]:
    """The build lock of the index at ``man_uri`` (local filesystems; elsewhere the commit's
    re-read of the manifest is the only guard)."""
    base = man_uri.rsplit("/", 1)[0]
    fs, base_path = resolve_filesystem(base, s3_endpoint)
    if isinstance(fs, pafs.LocalFileSystem):
        with build_lock(base_path, build_id, base):
            yield
    else:
        logger.info("%s: no build lock on this filesystem; the manifest is checked before commit", base)
        yield


def build_index(
    codes_uri: str,
    output_uri: str,
    cfg: IndexConfig,
    *,
    expected_fingerprint: str | None = None,
    config: dict[str, Any] | None = None,
    s3_endpoint: str | None = None,
    use_ray: bool = True,
    append: bool = False,
    labels_uri: str | None = None,
) -> IndexManifest:
    """Build the sharded index of the code shards under ``codes_uri`` into ``output_uri``.

    ``expected_fingerprint`` (from ``--checkpoint``) must match the shards' own fingerprint when
    they carry one; shards without metadata take it as theirs. ``append``: add the codes to the
    index already at ``output_uri`` as new shards (its type, parameters, IVF quantizer and model;
    the existing shards are not touched), refusing ids it already holds live. ``labels_uri``: a
    dataset whose ``labels`` column is stored beside each new shard, for label-filtered search.
    Returns the written manifest. Refuses (``BuildConflictError``) to run while another build
    holds the output's lock, and to commit when another build wrote the manifest while this one
    ran.
    """
    build_id = new_build_id()
    man_uri = manifest_location(output_uri)
    with index_lock(man_uri, build_id, s3_endpoint):
        return _build_locked(codes_uri, man_uri, build_id, cfg, expected_fingerprint=expected_fingerprint,
                             config=config, s3_endpoint=s3_endpoint, use_ray=use_ray, append=append,
                             labels_uri=labels_uri)


def read_current(man_uri: str, s3_endpoint: str | None, *, required: bool = False) -> IndexManifest | None:
    """The manifest now at ``man_uri``, None where there is none (ManifestError if unreadable, or
    if ``required`` and there is none)."""
    fs, path = resolve_filesystem(man_uri, s3_endpoint)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        if required:
            raise ManifestError(f"{man_uri}: no index there to change; build one first with "
                                "jobs/build_index.py --codes ... --output ...")
        return None
    return read_manifest(man_uri, s3_endpoint)


def trained_quantizer(man_uri: str, manifest: IndexManifest, s3_endpoint: str | None) -> bytes:
    """An empty IVF index with the index's trained quantizer: what new shards of it start from
    (every shard of a build shares one quantizer, so any shard gives it)."""
    import faiss

    from dcgh_dist.index.search import ShardedIndex

    with ShardedIndex.open(man_uri, s3_endpoint=s3_endpoint, shards=[0], mmap=False, verify="always") as one:
        ix = faiss.deserialize_index_binary(faiss.serialize_index_binary(one._shards()[0]))
    ix.reset()
    return faiss.serialize_index_binary(ix).tobytes()


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
    append: bool = False,
    labels_uri: str | None = None,
) -> IndexManifest:
    t0 = time.time()
    base = man_uri.rsplit("/", 1)[0]
    try:
        previous = read_current(man_uri, s3_endpoint, required=append)
    except ManifestError as e:
        if append:
            raise
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
    bits = source.bits
    labels = LabelTable.read(labels_uri, s3_endpoint) if labels_uri else None
    if append:
        if bits != previous.bits:
            raise ManifestError(f"{codes_uri}: {bits}-bit codes cannot be appended to {man_uri}, which holds "
                                f"{previous.bits}-bit codes")
        if previous.model_fingerprint is not None and fingerprint != previous.model_fingerprint:
            raise ManifestError(f"{codes_uri}: codes of model {fingerprint} cannot be appended to {man_uri}, "
                                f"built from model {previous.model_fingerprint}: re-encode with that model, "
                                "or build a new index")
        if (previous.num_classes is not None) != (labels is not None) or (
                labels is not None and labels.num_classes != previous.num_classes):
            have = f"labels of {previous.num_classes} classes" if previous.num_classes else "no labels"
            raise ValueError(f"{man_uri}: the index carries {have}; append with "
                             + (f"--labels DATASET of {previous.num_classes} classes" if previous.num_classes
                                else "no --labels (or rebuild the whole index with --labels)"))
        had = any(e.relaxed for e in previous.shards)
        if had != source.relaxed:
            raise ValueError(f"{codes_uri}: the index's shards {'carry' if had else 'do not carry'} relaxed codes "
                             f"(for re-ranking) and these codes {'do' if source.relaxed else 'do not'}; encode "
                             f"them {'with' if had else 'without'} --relaxed")
        # The index's own type, parameters and quantizer; how this append cuts shards is the caller's.
        cfg = dataclasses.replace(previous.index, shard_size=cfg.shard_size, task_cpus=cfg.task_cpus,
                                  keep_builds=cfg.keep_builds)
    if fingerprint is None:
        logger.warning("%s: codes carry no model fingerprint; the manifest will not pin a model", codes_uri)
    if cfg.index_type == "multihash":
        cfg.multihash_params(bits)  # fail before any work if they don't fit

    trained = None
    if cfg.index_type == "ivf":
        if append:
            trained = trained_quantizer(man_uri, previous, s3_endpoint)
        else:
            n_train = min(source.num_rows, cfg.train_size or 64 * cfg.nlist)
            sample = sample_codes(codes_uri, source, n_train, cfg.seed, s3_endpoint)
            trained = train_ivf(sample, bits, cfg)

    plan = plan_shards(source.files, cfg.shard_size)
    rels = [f"shards/{build_id}/shard-{i:05d}{SHARD_SUFFIX}" for i in range(len(plan))]
    logger.info("%s %d %s shard(s) of <= %d codes (%d bits) from %d rows", "appending" if append else "building",
                len(plan), cfg.index_type, cfg.shard_size, bits, source.num_rows)
    threads = max(1, int(cfg.task_cpus))
    args = [(codes_uri, sl, bits, cfg, join(base, rel), rel) for sl, rel in zip(plan, rels)]
    # task_cpus sizes Ray tasks; an in-process build keeps the process's own FAISS threads.
    kw = dict(trained=trained, s3_endpoint=s3_endpoint, threads=threads if use_ray else None, labels=labels,
              relaxed=source.relaxed)
    if use_ray:
        import ray

        task = ray.remote(num_cpus=cfg.task_cpus, max_retries=2)(_build_shard_task)
        shared = {name: ray.put(kw[name]) for name in ("trained", "labels") if kw[name] is not None}
        refs = [task.remote(*a, **{**kw, **shared}) for a in args]
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
    if append:
        _check_ids_are_new(man_uri, previous, codes_uri, plan, entries, s3_endpoint)
    manifest = IndexManifest(
        bits=bits, index=cfg, shards=(previous.shards if append else []) + entries,
        model_fingerprint=fingerprint if not append else previous.model_fingerprint,
        modality=source.modality if not append else previous.modality,
        config=config if config is not None else (previous.config if append else source.config),
        codes_uri=codes_uri, build_id=build_id, operation="append" if append else "build",
        num_classes=labels.num_classes if labels else None,
        extra={"build_seconds": round(time.time() - t0, 3), "added": source.num_rows},
    )
    return commit(man_uri, previous, manifest, s3_endpoint, t0)


def commit(man_uri: str, previous: IndexManifest | None, manifest: IndexManifest, s3_endpoint: str | None,
           t0: float) -> IndexManifest:
    """Make ``manifest`` the index's current version: number it, keep the ``keep_builds`` newest
    versions readable, write its immutable copy and then ``manifest.json``, and delete the
    directories (and version copies) no kept version reads."""
    base = man_uri.rsplit("/", 1)[0]
    build_id, keep = manifest.build_id, manifest.index.keep_builds
    manifest.version = previous.version + 1 if previous else 1
    manifest.parent = previous.build_id if previous else ""
    if previous is None:
        earlier: list[dict] = []
    elif previous.versions:
        earlier = previous.versions
    else:  # manifests from before versions: each retained build read its own directory
        earlier = [{"build_id": b, "version": None, "dirs": [b], "manifest": version_manifest_name(b)}
                   for b in previous.retained_builds]
    mine = {"build_id": build_id, "version": manifest.version, "dirs": manifest.dirs(),
            "manifest": version_manifest_name(build_id)}
    chain = [mine, *(v for v in earlier if v["build_id"] != build_id)]
    kept, dropped = chain[:keep], chain[keep:]
    kept_dirs = [build_id]
    for v in kept:
        kept_dirs += [d for d in v["dirs"] if d not in kept_dirs]
    manifest.versions, manifest.retained_builds = kept, kept_dirs
    known = [d for v in dropped for d in v["dirs"]] + (previous.retained_builds if previous else [])
    _check_unchanged(man_uri, previous, build_id, s3_endpoint)
    write_manifest(join(base, version_manifest_name(build_id)), manifest, s3_endpoint)
    write_manifest(man_uri, manifest, s3_endpoint)
    for old in dict.fromkeys(d for d in known if d not in kept_dirs):
        _remove_build(base, old, s3_endpoint)
    for v in dropped:
        fs, path = resolve_filesystem(join(base, version_manifest_name(v["build_id"])), s3_endpoint)
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(path)
    logger.info("wrote %s (version %d, %s): %d shards, %d codes, %d live, %.1fs", man_uri, manifest.version,
                manifest.operation, len(manifest.shards), manifest.num_items, manifest.num_live, time.time() - t0)
    return manifest


def _check_unchanged(
    man_uri: str, previous: IndexManifest | None, build_id: str, s3_endpoint: str | None
) -> None:
    """Refuse to commit over a manifest another build wrote while this one ran (the only guard
    where there is no lock, S3; a second one where there is)."""
    try:
        current = read_current(man_uri, s3_endpoint)
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


def _check_ids_are_new(man_uri: str, previous: IndexManifest, uri: str, plan: list, entries: list[ShardEntry],
                       s3_endpoint: str | None) -> None:
    """Appended ids must not be live in the index already (a deleted id may come back: its old
    code stays hidden by its shard's tombstones). Only shards whose id ranges overlap are read."""
    from dcgh_dist.index.search import ShardedIndex

    old = [i for i, e in enumerate(previous.shards) if e.rows and any(
        n.rows and n.id_min <= e.id_max and e.id_min <= n.id_max for n in entries)]
    if not old:
        return
    new_ids = np.concatenate([read_slices(uri, sl, s3_endpoint, columns=("id",))[0] for sl in plan])
    with ShardedIndex.open(man_uri, s3_endpoint=s3_endpoint, shards=old, verify="never") as index:
        for j, i in enumerate(old):
            clash = np.intersect1d(index.ids(j), new_ids)
            if clash.size:
                raise ValueError(
                    f"{uri}: id {int(clash[0])} ({clash.size} in all) is already in {man_uri} (shard {i}); "
                    "ids must be unique. To replace items, delete them first (--delete), then append")
