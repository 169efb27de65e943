"""Search across the shards of a built index: ``ShardedIndex.open(manifest_uri).search(q, k)``.

Shards are loaded memory-mapped where FAISS allows it (``IO_FLAG_MMAP_IFC``: flat codes are not
copied into RAM; the page cache holds them), after their checksum, bit width, row count and model
fingerprint were checked against the manifest. S3 shards are downloaded to a local cache first
(FAISS reads local files only), hashed on the way.

Queries go in batches; each batch is searched in every shard and the per-shard top-k lists are
merged (``faiss.merge_knn_results``). Many queries per batch: shards run one after the other and
FAISS parallelises over queries inside each (that keeps every core busy at no merge cost); few
queries: shards run in parallel threads, one FAISS thread each.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import pyarrow.fs as pafs

from dcgh_dist.data.format import resolve_filesystem
from dcgh_dist.index.codes import as_packed
from dcgh_dist.index.manifest import (
    IndexManifest,
    ManifestError,
    ShardEntry,
    manifest_location,
    read_manifest,
    resolve_shard_uri,
    sha256_stream,
)

logger = logging.getLogger(__name__)

# FAISS fills missing results (a shard with fewer than k items) with this distance and id -1.
_MISSING_DIST = np.iinfo(np.int32).max


def _default_cache_dir() -> str:
    return os.environ.get("DCGH_INDEX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "dcgh_dist", "index"
    )


class ShardedIndex:
    """A sharded FAISS binary index described by a manifest.

    Results are Hamming distances (int32) and the user's int64 ids, ``-1`` where fewer than k
    items exist. With a ``flat`` index the k-NN lists equal a brute-force scan up to the order of
    equal distances (which FAISS does not fix; use :meth:`search_stable` for a deterministic
    order).
    """

    def __init__(self, manifest: IndexManifest, indexes: list, uri: str = ""):
        self.manifest = manifest
        self.uri = uri
        self._indexes = indexes
        self._offsets = [s.id_offset if s.id_layout == "offset" else None for s in manifest.shards]
        import faiss

        self.threads = faiss.omp_get_max_threads()

    # ---------------------------------------------------------------------------------------
    # Opening

    @classmethod
    def open(
        cls,
        manifest_uri: str,
        *,
        s3_endpoint: str | None = None,
        expected_fingerprint: str | None = None,
        checkpoint: str | None = None,
        expected_bits: int | None = None,
        verify: bool = True,
        mmap: bool = True,
        nprobe: int | None = None,
        cache_dir: str | None = None,
    ) -> "ShardedIndex":
        """Load every shard of the manifest at ``manifest_uri`` (its file or its directory).

        Refuses (``ManifestError``, naming the shard) a shard whose sha256 (``verify=True``; with
        ``False`` only the size is checked), bit width or row count differs from the manifest, and
        an index whose model fingerprint differs from ``expected_fingerprint`` or from that of
        ``checkpoint`` (a checkpoint directory), or whose bit width differs from
        ``expected_bits``.
        """
        import faiss

        uri = manifest_location(manifest_uri)
        manifest = read_manifest(uri, s3_endpoint)
        if checkpoint is not None:
            from dcgh_dist.train.checkpoint import read_meta

            meta = read_meta(checkpoint)
            expected_fingerprint = expected_fingerprint or meta.fingerprint
            expected_bits = expected_bits or meta.config.model.bits
        if expected_bits is not None and manifest.bits != expected_bits:
            raise ManifestError(
                f"{uri}: index holds {manifest.bits}-bit codes, expected {expected_bits} bits"
            )
        if expected_fingerprint is not None and manifest.model_fingerprint != expected_fingerprint:
            raise ManifestError(
                f"{uri}: index was built from codes of model {manifest.model_fingerprint}, not "
                f"of the expected model {expected_fingerprint}; re-encode and rebuild, or open "
                "it without a checkpoint"
            )
        t0 = time.time()
        indexes = [
            _load_shard(uri, i, s, manifest, s3_endpoint, verify, mmap, cache_dir or _default_cache_dir())
            for i, s in enumerate(manifest.shards)
        ]
        if manifest.index.index_type == "ivf":
            for ix in indexes:
                ix.nprobe = nprobe or manifest.index.nprobe
        logger.info("opened %s: %d shards, %d codes in %.1fs", uri, len(indexes), manifest.num_items,
                    time.time() - t0)
        return cls(manifest, indexes, uri)

    # ---------------------------------------------------------------------------------------
    # Properties

    @property
    def bits(self) -> int:
        return self.manifest.bits

    @property
    def ntotal(self) -> int:
        return self.manifest.num_items

    @property
    def exact(self) -> bool:
        """True when k-NN search equals a brute-force scan (flat indexes)."""
        return self.manifest.exact

    @property
    def index_type(self) -> str:
        return self.manifest.index.index_type

    def __len__(self) -> int:
        return self.ntotal

    def set_nprobe(self, nprobe: int) -> None:
        import faiss

        if self.index_type != "ivf":
            raise ValueError(f"nprobe applies to ivf indexes, this one is {self.index_type}")
        for ix in self._indexes:
            ix.nprobe = nprobe

    # ---------------------------------------------------------------------------------------
    # k-NN

    def search(
        self, query_codes: np.ndarray, k: int, *, batch_size: int = 4096
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top k over all shards: ``(distances int32 (nq, k), ids int64 (nq, k))``.

        ``query_codes``: packed uint8 (nq, bits/8), or (nq, bits) ±1 / relaxed / {0,1} codes.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = as_packed(query_codes, self.bits)
        nq = len(q)
        D = np.empty((nq, k), dtype=np.int32)
        I = np.empty((nq, k), dtype=np.int64)
        for start in range(0, nq, batch_size):
            stop = min(nq, start + batch_size)
            D[start:stop], I[start:stop] = self._search_batch(q[start:stop], k)
        return D, I

    def _search_batch(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        n_shards = len(self._indexes)

        def one(i: int, single_thread: bool):
            if single_thread:
                faiss.omp_set_num_threads(1)
            d, ix = self._indexes[i].search(q, k)
            return d, self._to_ids(i, ix)

        if n_shards > 1 and self.threads > 1 and len(q) < 4 * self.threads:
            # Few queries: FAISS parallelises poorly inside a shard (IVF: not at all), so the
            # shards are searched in parallel, one FAISS thread each.
            with ThreadPoolExecutor(min(n_shards, self.threads)) as pool:
                results = list(pool.map(lambda i: one(i, True), range(n_shards)))
        else:
            results = [one(i, False) for i in range(n_shards)]
        if n_shards == 1:
            return results[0]
        Dall = np.stack([r[0] for r in results])
        Iall = np.stack([r[1] for r in results])
        D, I = faiss.merge_knn_results(Dall, Iall)
        return D, I

    def _to_ids(self, shard: int, positions: np.ndarray) -> np.ndarray:
        off = self._offsets[shard]
        if not off:
            return positions
        return np.where(positions >= 0, positions + off, -1)

    def search_stable(
        self, query_codes: np.ndarray, k: int, *, batch_size: int = 4096, margin: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top k ranked by (distance, id): deterministic whatever the sharding.

        Ties at the k-th distance are resolved by the smallest ids, so every item at that
        distance must be seen: the first fetch asks for ``k + margin``; queries whose fetched
        list ends at the k-th distance (more ties than fetched) get a range search at that
        distance. This is the ranking of :mod:`dcgh_dist.metrics` when the database is in id
        order. Exact for flat indexes; on approximate ones, the order of what they find.
        """
        q = as_packed(query_codes, self.bits)
        k_eff = min(k, self.ntotal)
        margin = max(16, k_eff // 4) if margin is None else margin
        k_fetch = min(self.ntotal, k_eff + margin)
        D, I = self.search(q, k_fetch, batch_size=batch_size)
        D, I = _sort_rows(D, I)
        out_D = np.full((len(q), k), _MISSING_DIST, dtype=np.int32)
        out_I = np.full((len(q), k), -1, dtype=np.int64)
        out_D[:, :k_eff], out_I[:, :k_eff] = D[:, :k_eff], I[:, :k_eff]
        if k_fetch == self.ntotal:
            return out_D, out_I  # everything was fetched: the sorted lists are complete
        dk = D[:, k_eff - 1]
        redo = np.flatnonzero(D[:, -1] == dk)
        if redo.size:
            logger.debug("search_stable: %d/%d queries need a range search for ties", redo.size, len(q))
            # One range search per distinct k-th distance, over the queries that share it.
            for radius in np.unique(dk[redo]):
                rows = redo[dk[redo] == radius]
                lims, rd, ri = self.range_search(q[rows], int(radius), batch_size=batch_size)
                for j, r in enumerate(rows):
                    lo = lims[j]
                    out_D[r, :k_eff] = rd[lo:lo + k_eff]
                    out_I[r, :k_eff] = ri[lo:lo + k_eff]
        return out_D, out_I

    # ---------------------------------------------------------------------------------------
    # Radius search

    def range_search(
        self, query_codes: np.ndarray, radius: int, *, batch_size: int = 1024
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every item within Hamming distance ``radius`` (inclusive) of each query.

        Returns ``(lims, distances, ids)`` in FAISS's layout: query i's results are
        ``[lims[i]:lims[i+1]]``, sorted by (distance, id). Exact for flat, exact for multihash up
        to its pigeonhole radius (larger radii are refused: the result would silently miss
        items), approximate for ivf.
        """
        exact_r = self.manifest.index.exact_radius(self.bits)
        if self.index_type == "multihash" and radius > exact_r:
            raise ValueError(
                f"radius {radius} exceeds what this multihash index searches exactly ({exact_r} = "
                "nhash * (nflip + 1) - 1); rebuild with a larger mh_nflip or use a flat index"
            )
        q = as_packed(query_codes, self.bits)
        lims_all, D_all, I_all = [np.zeros(1, dtype=np.int64)], [], []
        for start in range(0, len(q), batch_size):
            qb = q[start:start + batch_size]
            nqb = len(qb)
            qidx, dists, ids = [], [], []
            for s, ix in enumerate(self._indexes):
                # FAISS's binary range search keeps distance < radius: ask for radius + 1.
                lims, d, i = ix.range_search(qb, radius + 1)
                counts = np.diff(lims.astype(np.int64))
                qidx.append(np.repeat(np.arange(nqb), counts))
                dists.append(d.astype(np.int32))
                ids.append(self._to_ids(s, i.astype(np.int64)))
            qidx, dists, ids = np.concatenate(qidx), np.concatenate(dists), np.concatenate(ids)
            order = np.lexsort((ids, dists, qidx))
            D_all.append(dists[order])
            I_all.append(ids[order])
            lims_all.append(lims_all[-1][-1] + np.cumsum(np.bincount(qidx, minlength=nqb)))
        return (np.concatenate(lims_all), np.concatenate(D_all) if D_all else np.zeros(0, np.int32),
                np.concatenate(I_all) if I_all else np.zeros(0, np.int64))


def _sort_rows(D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (distance, id), missing results (-1) last."""
    key_id = np.where(I < 0, np.iinfo(np.int64).max, I)
    order = np.lexsort((key_id, D), axis=-1)
    return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)


def _load_shard(
    manifest_uri: str, i: int, entry: ShardEntry, manifest: IndexManifest, s3_endpoint: str | None,
    verify: bool, mmap: bool, cache_dir: str,
):
    import faiss

    uri = resolve_shard_uri(manifest_uri, entry.uri)
    where = f"{manifest_uri}: shard {i} ({uri})"
    fs, path = resolve_filesystem(uri, s3_endpoint)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise ManifestError(f"{where}: file missing")
    if info.size != entry.bytes:
        raise ManifestError(
            f"{where}: {info.size} bytes on disk, manifest says {entry.bytes}: the shard is "
            "truncated, corrupted or from another build; rebuild the index"
        )
    if isinstance(fs, pafs.LocalFileSystem):
        local = path
        if verify:
            digest, _ = sha256_stream(fs, path)
            _check_digest(where, digest, entry)
    else:
        os.makedirs(cache_dir, exist_ok=True)
        local = os.path.join(cache_dir, f"{entry.sha256}.faissindex")
        if os.path.exists(local) and os.path.getsize(local) == entry.bytes:
            if verify:
                digest, _ = sha256_stream(pafs.LocalFileSystem(), local)
                if digest != entry.sha256:
                    os.remove(local)  # a bad cached copy: fetch again
        if not os.path.exists(local):
            tmp = f"{local}.part-{os.getpid()}"
            digest, _ = sha256_stream(fs, path, copy_to=tmp)
            if digest != entry.sha256:
                os.remove(tmp)
            _check_digest(where, digest, entry)
            os.replace(tmp, local)
    flags = 0
    if mmap and manifest.index.index_type != "ivf":
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
    try:
        index = faiss.read_index_binary(local, flags)
    except RuntimeError as e:
        raise ManifestError(f"{where}: FAISS cannot read it ({str(e).splitlines()[0]})") from e
    if index.d != manifest.bits:
        raise ManifestError(f"{where}: index has {index.d}-bit codes, manifest says {manifest.bits}")
    if index.ntotal != entry.rows:
        raise ManifestError(f"{where}: index holds {index.ntotal} codes, manifest says {entry.rows}")
    return index


def _check_digest(where: str, digest: str, entry: ShardEntry) -> None:
    if digest != entry.sha256:
        raise ManifestError(
            f"{where}: sha256 {digest[:16]}... does not match the manifest's {entry.sha256[:16]}...: "
            "the shard is corrupted or was replaced; rebuild the index"
        )


def brute_force_search(
    query_packed: np.ndarray, db_packed: np.ndarray, db_ids: Sequence[int], k: int, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Reference k-NN by a numpy Hamming scan, ranked by (distance, id). For tests and checks."""
    from dcgh_dist.index.codes import hamming_distances

    db_ids = np.asarray(db_ids, dtype=np.int64)
    order_ids = np.argsort(db_ids, kind="stable")
    db_sorted, ids_sorted = db_packed[order_ids], db_ids[order_ids]
    k_eff = min(k, len(ids_sorted))
    outD, outI = [], []
    for s in range(0, len(query_packed), chunk):
        d = hamming_distances(query_packed[s:s + chunk], db_sorted)
        o = np.argsort(d, axis=1, kind="stable")[:, :k_eff]
        outD.append(np.take_along_axis(d, o, axis=1))
        outI.append(ids_sorted[o])
    return np.concatenate(outD), np.concatenate(outI)
