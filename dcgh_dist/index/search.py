"""Search across the shards of a built index: ``ShardedIndex.open(manifest_uri).search(q, k)``.

Opening checks every shard against the manifest (size, sha256 unless told otherwise, bit width,
row count, model fingerprint) and loads the shards in parallel threads, memory-mapped where FAISS
allows it. S3 shards are downloaded to a local cache first (FAISS reads local files only), hashed
on the way.

Queries go in batches; each batch is searched in every shard and the per-shard top-k lists are
merged (``faiss.merge_knn_results``). Many queries per batch: shards run one after the other and
FAISS parallelises over queries inside each (that keeps every core busy at no merge cost); few
queries: shards run in parallel on the index's thread pool, one FAISS thread each.

An open index is meant to be held by a long-running server: searches never change it (``nprobe``
is a per-call argument), so any number of threads may search it at once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, NamedTuple

import numpy as np
import pyarrow.fs as pafs

from dcgh_dist.codes import as_packed
from dcgh_dist.index.filters import SearchFilter, ShardView
from dcgh_dist.index.manifest import (
    IndexManifest,
    ManifestError,
    ShardEntry,
    manifest_location,
    read_manifest,
    resolve_shard_uri,
)
from dcgh_dist.storage import read_bytes, resolve_filesystem, sha256_stream, write_text_atomic

logger = logging.getLogger(__name__)

# FAISS fills missing results (a shard with fewer than k items) with this distance and id -1.
_MISSING_DIST = np.iinfo(np.int32).max

VERIFY_MODES = ("always", "once", "never")


class IndexClosedError(ValueError):
    """A search on a :class:`ShardedIndex` after its :meth:`~ShardedIndex.close`."""


def _default_cache_dir() -> str:
    return os.environ.get("DCGH_INDEX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "dcgh_dist", "index"
    )


class _Shard(NamedTuple):
    index: object  # a faiss.IndexBinary
    mmapped: bool
    identity: dict | None  # the verified file, as "once" records it (None: not recorded)
    view: ShardView  # its ids, tombstones and labels, for filtered searches


# How a filtered or tombstoned shard is searched (ShardedIndex._search_masked): a filter allowing
# at most 1/SELECTIVE of the shard is an exact scan of the allowed items; at most LEFT_OUT_FETCH
# items left out, FAISS's own search for k + that many, the rest dropped.
LEFT_OUT_FETCH = 4096
SELECTIVE = 16


class ShardedIndex:
    """A sharded FAISS binary index described by a manifest. Open it with :meth:`open`.

    Results are Hamming distances (int32) and the user's int64 ids, ``-1`` where fewer than k
    items exist. With a ``flat`` index the k-NN lists equal a brute-force scan up to the order of
    equal distances (which FAISS does not fix; use :meth:`search_stable` for a deterministic
    order).

    Thread-safe: :meth:`search`, :meth:`search_stable` and :meth:`range_search` may run in many
    threads at once, each with its own ``nprobe``. :meth:`close` (or leaving a ``with`` block)
    releases the shards and the thread pool; searches running then finish, later ones raise
    :class:`IndexClosedError`.

    Attributes: ``manifest``, ``uri`` (the manifest's), ``nprobe`` (the default for IVF
    searches, None for other types), ``threads`` (shard-parallel threads), ``mmapped`` (per
    shard: read memory-mapped, or into memory).
    """

    def __init__(self, manifest: IndexManifest, shards: list[_Shard], pool: ThreadPoolExecutor,
                 *, uri: str, nprobe: int | None, threads: int):
        self.manifest = manifest
        self.uri = uri
        self.nprobe = nprobe
        self.threads = threads
        self.mmapped = [s.mmapped for s in shards]
        # (indexes, views); None once closed. A search reads it once: a close() meanwhile leaves
        # the lists it holds alive.
        self._open: tuple[list, list[ShardView]] | None = ([s.index for s in shards], [s.view for s in shards])
        self._pool = pool
        self._offsets = [s.id_offset if s.id_layout == "offset" else None for s in manifest.shards]
        # IVF range search takes nprobe only through the shard's attribute (see _range_one).
        self._nprobe_locks = [threading.Lock() for _ in shards]

    # ---------------------------------------------------------------------------------------
    # Opening and closing

    @classmethod
    def open(
        cls,
        manifest_uri: str,
        *,
        s3_endpoint: str | None = None,
        expected_fingerprint: str | None = None,
        checkpoint: str | None = None,
        expected_bits: int | None = None,
        verify: Literal["always", "once", "never"] = "always",
        mmap: bool = True,
        nprobe: int | None = None,
        threads: int | None = None,
        cache_dir: str | None = None,
        shards: Sequence[int] | None = None,
    ) -> ShardedIndex:
        """Load every shard of the manifest at ``manifest_uri`` (its file or its directory), or
        the manifest's shards numbered ``shards``: an index larger than one machine is served by
        several processes each holding a part (the Serve app's shard groups), whose top-k lists
        merge into the whole index's (``search_stable``: exactly).

        Refuses (``ManifestError``, naming the shard) a shard whose size, sha256 (see ``verify``),
        bit width or row count differs from the manifest, and an index whose model fingerprint
        differs from ``expected_fingerprint`` or from that of ``checkpoint`` (a checkpoint
        directory), or whose bit width differs from ``expected_bits``.

        ``verify``, the sha256 pass (sizes, bit widths and row counts are always checked):

        * ``"always"``: hash every shard at every open (an S3 shard: its cached copy, or the
          download on the way).
        * ``"once"``: hash a shard unless ``cache_dir`` holds a record that this very file was
          hashed for this manifest and matched; once every shard checked out, write that record
          (``<cache_dir>/verified/<build_id>.<key>.json``, ``key`` a sha256 of the manifest's
          location and content). A replica restarted on the same node, or a second deployment of
          the same build, skips the hashing; another build, a changed manifest or a copy of the
          index elsewhere has no record and is hashed, and so is a shard file that was rewritten,
          replaced or touched since (its record no longer matches).
        * ``"never"``: sizes only, for indexes you built and trust.

        What skipping (``"once"``) assumes: a file whose absolute path, size, inode, mtime and
        ctime are those recorded still holds the bytes that were hashed. Every write through the
        filesystem changes mtime and ctime, and ctime cannot be set back, so this holds unless the
        bytes change beneath the filesystem (silent media corruption, writes to the raw device).
        It also assumes that whoever can write to ``cache_dir`` is trusted as far as whoever can
        write the shards: a forged record skips the check.

        ``mmap``: local shards and S3 cache copies are read with ``IO_FLAG_MMAP_IFC``, which in
        FAISS 1.15 maps every type this project builds: the codes of flat shards (an id-map
        shard's ids are read into memory), the codes and ids of IVF inverted lists (kept as
        ``ArrayInvertedLists`` whose buffers are views of the mapping), the codes of multihash
        shards (their hash tables are built in memory at load). ``IO_FLAG_MMAP`` is not used: it
        does not map flat indexes at all (they are read into memory), and for IVF it gives
        ``OnDiskInvertedLists`` (lists on disk, with prefetching of their own), whose searches
        took 3-4x as long in a check here (1M codes, 8 queries, nprobe 8, FAISS 1.15.1). A shard
        FAISS cannot read mapped is read into memory, with a warning; ``mmapped`` says which. A
        mapped shard file must not be truncated or rewritten in place while it is open; the
        builder never does that (new builds go to new directories, old ones are unlinked, which
        leaves open mappings intact).

        ``nprobe``: the default for IVF searches (the manifest's if None). ``threads``: threads
        for opening shards in parallel and for searching them in parallel (default: FAISS's
        OpenMP thread count). ``cache_dir``: S3 shard copies and ``"once"`` records (default
        ``$DCGH_INDEX_CACHE`` or ``~/.cache/dcgh_dist/index``).
        """
        import faiss

        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {list(VERIFY_MODES)}, got {verify!r}")
        threads = faiss.omp_get_max_threads() if threads is None else threads
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        uri = manifest_location(manifest_uri)
        manifest = read_manifest(uri, s3_endpoint)
        if shards is not None:
            picked = sorted(set(shards))
            if not picked or picked[0] < 0 or picked[-1] >= len(manifest.shards):
                raise ValueError(f"{uri}: shards must be a non-empty subset of 0..{len(manifest.shards) - 1}, "
                                 f"got {list(shards)}")
            manifest = dataclasses.replace(manifest, shards=[manifest.shards[i] for i in picked])
        if checkpoint is not None:
            from dcgh_dist.models.checkpoint import verified_meta

            meta = verified_meta(checkpoint, s3_endpoint)  # weights that match the fingerprint
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
        if nprobe is not None:
            nprobe = _check_nprobe(nprobe, manifest, uri)
        elif manifest.index.index_type == "ivf":
            nprobe = manifest.index.nprobe
        cache_dir = cache_dir or _default_cache_dir()
        record = _record_path(cache_dir, uri, manifest) if verify == "once" else None
        known = _read_record(record, len(manifest.shards)) if record else [None] * len(manifest.shards)

        t0 = time.time()
        # Pool threads run one FAISS thread each: they open, and search, one shard per task.
        pool = ThreadPoolExecutor(max(1, min(len(manifest.shards), threads)),
                                  thread_name_prefix="dcgh-index",
                                  initializer=faiss.omp_set_num_threads, initargs=(1,))
        try:
            # FAISS reads and hashing release the GIL, and S3 downloads wait on the network:
            # threads overlap them. map() keeps the manifest's order and raises the first failing
            # shard's error, as one-by-one opening would.
            shards = list(pool.map(
                lambda i: _load_shard(uri, i, manifest.shards[i], manifest, s3_endpoint, verify,
                                      known[i], mmap, cache_dir),
                range(len(manifest.shards))))
        except BaseException:
            # Loads already running finish (and clean up after themselves) before the error
            # reaches the caller: no download is left half-written in the cache.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        if record:
            identities = [s.identity for s in shards]
            if identities != known:
                _write_record(record, uri, manifest, identities)
        logger.info("opened %s: %d shards (%d memory-mapped), %d codes in %.1fs", uri, len(shards),
                    sum(s.mmapped for s in shards), manifest.num_items, time.time() - t0)
        return cls(manifest, shards, pool, uri=uri, nprobe=nprobe, threads=threads)

    def close(self) -> None:
        """Release the shards (their memory and mappings go once no running search holds them)
        and the thread pool. Later searches raise :class:`IndexClosedError`; closing twice is
        fine."""
        self._open = None
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ids(self, shard: int, *, live: bool = True) -> np.ndarray:
        """The ids shard number ``shard`` holds (``live``: less the deleted ones), in the order
        the shard keeps them: the manifest's range for an offset shard, else read from the index
        (an id map's table, or an IVF index's inverted lists)."""
        self._shards()
        view = self.view(shard)
        ids = view.position_ids()
        keep = view.live() if live else None
        return ids if keep is None else ids[keep]

    def _state(self) -> tuple[list, list[ShardView]]:
        state = self._open
        if state is None:
            raise IndexClosedError(f"{self.uri}: this ShardedIndex was closed; open it again")
        return state

    def _shards(self) -> list:
        return self._state()[0]

    def view(self, shard: int) -> ShardView:
        """Shard ``shard``'s ids, tombstones, labels and codes (:class:`ShardView`)."""
        return self._state()[1][shard]

    def _in_pool(self, fn: Callable[[int], tuple], n: int) -> list:
        try:
            futures = [self._pool.submit(fn, i) for i in range(n)]
        except RuntimeError as e:  # the pool was shut down by a close() since this search began
            raise IndexClosedError(f"{self.uri}: this ShardedIndex was closed during the search") from e
        return [f.result() for f in futures]

    # ---------------------------------------------------------------------------------------
    # Properties

    @property
    def bits(self) -> int:
        return self.manifest.bits

    @property
    def ntotal(self) -> int:
        """Items a search can return (deleted ones are not counted)."""
        return self.manifest.num_live

    @property
    def num_classes(self) -> int | None:
        """The number of classes the shards' labels cover (None: no labels, no label filters)."""
        return self.manifest.num_classes

    @property
    def exact(self) -> bool:
        """True when k-NN search equals a brute-force scan (flat indexes)."""
        return self.manifest.exact

    @property
    def index_type(self) -> str:
        return self.manifest.index.index_type

    def __len__(self) -> int:
        return self.ntotal

    def _nprobe(self, nprobe: int | None) -> int | None:
        return self.nprobe if nprobe is None else _check_nprobe(nprobe, self.manifest, self.uri)

    # ---------------------------------------------------------------------------------------
    # k-NN

    def search(
        self, query_codes: np.ndarray, k: int, *, nprobe: int | None = None, batch_size: int = 4096,
        filter: SearchFilter | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top k over all shards: ``(distances int32 (nq, k), ids int64 (nq, k))``.

        ``query_codes``: packed uint8 (nq, bits/8), or (nq, bits) ±1 / relaxed / {0,1} codes.
        ``nprobe``: IVF lists probed by this call (default: :attr:`nprobe`); IVF indexes only.
        ``filter``: only items it allows (:class:`~dcgh_dist.index.filters.SearchFilter`), with k
        results wherever k exist; exact on flat indexes, and on any index where the filter is
        selective (see ``SELECTIVE``). Deleted items are never returned, filter or not.
        """
        self._shards()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        nprobe = self._nprobe(nprobe)
        q = as_packed(query_codes, self.bits)
        return self._knn(q, k, nprobe, batch_size, self._masks(filter))

    def _knn(self, q: np.ndarray, k: int, nprobe: int | None, batch_size: int, masks: list) -> tuple[np.ndarray, np.ndarray]:
        nq = len(q)
        D = np.empty((nq, k), dtype=np.int32)
        I = np.empty((nq, k), dtype=np.int64)
        for start in range(0, nq, batch_size):
            stop = min(nq, start + batch_size)
            D[start:stop], I[start:stop] = self._search_batch(q[start:stop], k, nprobe, masks)
        return D, I

    def _masks(self, flt: SearchFilter | None) -> list[tuple[np.ndarray | None, int, ShardView]]:
        """Per shard, (position mask of what may be returned or None for all, how many, its view)."""
        if flt is not None:
            flt.check(self.num_classes, self.uri)
        out = []
        for view in self._state()[1]:
            mask = view.allowed(flt, self.num_classes)
            out.append((mask, view.rows if mask is None else int(np.count_nonzero(mask)), view))
        return out

    def _search_batch(self, q: np.ndarray, k: int, nprobe: int | None,
                      masks: list[tuple[np.ndarray | None, int, ShardView]]) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        indexes = self._shards()
        n_shards = len(indexes)
        # Per-call parameters, read-only inside FAISS: nothing shared is changed by a search.
        params = None if nprobe is None else faiss.SearchParametersIVF(nprobe=nprobe)

        def one(i: int):
            allowed, n_allowed, view = masks[i]
            if allowed is not None:
                return self._search_masked(i, indexes[i], view, q, k, params, allowed, n_allowed)
            d, ix = indexes[i].search(q, k, params=params)
            return d, self._to_ids(i, ix)

        if n_shards > 1 and self.threads > 1 and len(q) < 4 * self.threads:
            # Few queries: FAISS parallelises poorly inside a shard (IVF: not at all), so the
            # shards are searched in parallel, one FAISS thread each.
            results = self._in_pool(one, n_shards)
        else:
            results = [one(i) for i in range(n_shards)]
        if n_shards == 1:
            return results[0]
        Dall = np.stack([r[0] for r in results])
        Iall = np.stack([r[1] for r in results])
        D, I = faiss.merge_knn_results(Dall, Iall)
        return D, I

    def _search_masked(self, i: int, index, view: ShardView, q: np.ndarray, k: int, params,
                       allowed: np.ndarray, n_allowed: int) -> tuple[np.ndarray, np.ndarray]:
        """Top k of shard ``i`` among the positions ``allowed`` marks (tombstones, filters).

        Measured (benchmarks/bench_filters.py): FAISS's flat scan with an IDSelectorBitmap ran
        4-9x slower than the plain scan, while gathering the allowed codes and scanning them
        (``faiss.knn_hamming``) beat even the plain scan at half the items. So:

        * a selective filter (at most 1/SELECTIVE of the shard), any type: the gathered scan, exact;
        * a few items left out (tombstones, an almost-everything filter): FAISS's own search for
          k + that many, the left-out dropped; exact on flat, what ``nprobe`` probes on IVF;
        * flat, otherwise: the gathered scan, exact;
        * IVF / multihash, broad filter: fetch ~k / (allowed fraction) from the probed lists, drop
          what is not allowed; a query still short (its probed lists hold too few allowed items,
          as when labels follow the clusters) gets the gathered scan, exact.
        """
        nq, rows = len(q), view.rows
        D = np.full((nq, k), _MISSING_DIST, dtype=np.int32)
        I = np.full((nq, k), -1, dtype=np.int64)
        if n_allowed == 0:
            return D, I
        left_out = rows - n_allowed
        if n_allowed * SELECTIVE <= rows:
            self._scan_allowed(view, q, k, allowed, n_allowed, D, I, np.arange(nq))
            return D, I
        if left_out <= LEFT_OUT_FETCH:
            self._fetch_and_drop(i, index, view, q, min(rows, k + left_out), k, params, allowed, D, I,
                                 np.arange(nq))
            return D, I
        if view.flat() is not None:
            self._scan_allowed(view, q, k, allowed, n_allowed, D, I, np.arange(nq))
            return D, I
        kk = min(rows, int(np.ceil(1.25 * k * rows / n_allowed)))
        short = self._fetch_and_drop(i, index, view, q, kk, k, params, allowed, D, I, np.arange(nq))
        if short.size:
            self._scan_allowed(view, q, k, allowed, n_allowed, D, I, short)
        return D, I

    def _fetch_and_drop(self, i, index, view, q, kk, k, params, allowed, D, I, rows_of) -> np.ndarray:
        """FAISS's top ``kk`` of shard ``i``, the not-allowed dropped, into ``D, I`` (rows
        ``rows_of``); returns the rows that got fewer than k though the fetch was full."""
        d, ids = index.search(q[rows_of], kk, params=params)
        ids = self._to_ids(i, ids)
        pos, found = view.positions_of(ids.ravel())
        ok = (ids.ravel() >= 0) & found
        ok[ok] = allowed[pos[ok]]
        ok = ok.reshape(ids.shape)
        w = min(k, kk)  # a shard smaller than k gives fewer columns
        order = np.argsort(~ok, axis=1, kind="stable")[:, :w]  # the allowed ones, best first
        got = np.take_along_axis(ok, order, axis=1)
        D[rows_of] = _MISSING_DIST
        I[rows_of] = -1
        D[rows_of, :w] = np.where(got, np.take_along_axis(d, order, axis=1), _MISSING_DIST)
        I[rows_of, :w] = np.where(got, np.take_along_axis(ids, order, axis=1), -1)
        # A row whose fetch came back incomplete has seen all FAISS can find for it.
        short = (got.sum(axis=1) < k) & (ids >= 0).all(axis=1)
        return rows_of[short]

    @staticmethod
    def _scan_allowed(view, q, k, allowed, n_allowed, D, I, rows_of) -> None:
        """Exact top k among the allowed items: their codes gathered and scanned alone."""
        import faiss

        pos = np.flatnonzero(allowed)
        kk = min(k, n_allowed)
        d, p = faiss.knn_hamming(q[rows_of], np.ascontiguousarray(view.codes()[pos]), kk)
        D[rows_of] = _MISSING_DIST
        I[rows_of] = -1
        D[rows_of, :kk] = d
        I[rows_of, :kk] = view.position_ids()[pos[p]]

    def _to_ids(self, shard: int, positions: np.ndarray) -> np.ndarray:
        off = self._offsets[shard]
        if not off:
            return positions
        return np.where(positions >= 0, positions + off, -1)

    def search_stable(
        self, query_codes: np.ndarray, k: int, *, nprobe: int | None = None, batch_size: int = 4096,
        margin: int | None = None, filter: SearchFilter | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top k ranked by (distance, id): deterministic whatever the sharding.

        Ties at the k-th distance are resolved by the smallest ids, so every item at that
        distance must be seen: the first fetch asks for ``k + margin``; queries whose fetched
        list ends at the k-th distance (more ties than fetched) get a range search at that
        distance. This is the ranking of :mod:`dcgh_dist.metrics` when the database is in id
        order. Exact for flat indexes; on approximate ones, the order of what they find (IVF:
        both the fetch and the range search probe ``nprobe`` lists).
        """
        self._shards()
        nprobe = self._nprobe(nprobe)
        q = as_packed(query_codes, self.bits)
        # What the search may return: every live item, or what the filter allows.
        masks = self._masks(filter)  # once for the fetch and any range search below
        n_avail = self.ntotal if filter is None else sum(n for _, n, _ in masks)
        if n_avail == 0:
            return (np.full((len(q), k), _MISSING_DIST, dtype=np.int32), np.full((len(q), k), -1, dtype=np.int64))
        k_eff = min(k, n_avail)
        # A FAISS flat scan costs the same for k up to a few hundred (the heap is rarely
        # touched), and a range search is a second scan: fetch enough that ties at the k-th
        # distance rarely reach the end. 64: on 10M random 64-bit codes, a margin of 16 sent half the
        # k=10 queries to a range search, 64 none: 0.73x the p50 (benchmarks/bench_search_stable.py).
        margin = max(64, k_eff // 4) if margin is None else margin
        k_fetch = min(n_avail, k_eff + margin)
        D, I = self._knn(q, k_fetch, nprobe, batch_size, masks)
        D, I = _sort_rows(D, I)
        out_D = np.full((len(q), k), _MISSING_DIST, dtype=np.int32)
        out_I = np.full((len(q), k), -1, dtype=np.int64)
        out_D[:, :k_eff], out_I[:, :k_eff] = D[:, :k_eff], I[:, :k_eff]
        if k_fetch == n_avail:
            return out_D, out_I  # everything was fetched: the sorted lists are complete
        dk = D[:, k_eff - 1]
        # (A row that came back short, as a multihash k-NN beyond its radius can, is complete.)
        redo = np.flatnonzero((D[:, -1] == dk) & (dk != _MISSING_DIST))
        if redo.size:
            logger.debug("search_stable: %d/%d queries need a range search for ties", redo.size, len(q))
            # One range search per distinct k-th distance, over the queries that share it.
            for radius in np.unique(dk[redo]):
                rows = redo[dk[redo] == radius]
                lims, rd, ri = self._range(q[rows], int(radius), nprobe, batch_size, masks)
                for j, r in enumerate(rows):
                    lo = lims[j]
                    out_D[r, :k_eff] = rd[lo:lo + k_eff]
                    out_I[r, :k_eff] = ri[lo:lo + k_eff]
        return out_D, out_I

    # ---------------------------------------------------------------------------------------
    # Re-ranking by the relaxed codes

    def relaxed_scores(self, query_relaxed: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(nq, m) inner products of each query's relaxed (tanh) code with the stored relaxed codes
        of the ids in its row of ``ids`` (-inf where an id is -1). Needs an index built from
        ``encode --relaxed`` code shards."""
        views = self._state()[1]
        if not all(v.has_relaxed for v in views):
            raise ValueError(f"{self.uri}: this index stores no relaxed codes, so it cannot re-rank; encode "
                             "with --relaxed and build the index from those codes")
        qr = np.asarray(query_relaxed, dtype=np.float32)
        if qr.shape != (len(ids), self.bits):
            raise ValueError(f"query_relaxed must be ({len(ids)}, {self.bits}), got {qr.shape}")
        flat = np.asarray(ids, dtype=np.int64).ravel()
        rows = np.zeros((flat.size, self.bits), dtype=np.float32)
        for v in views:
            pos, found = v.positions_of(flat)
            found &= flat >= 0
            live = v.live()
            if live is not None:
                found[found] = live[pos[found]]  # an id deleted here and live elsewhere: the live copy
            if found.any():
                rows[found] = v.relaxed()[pos[found]]
        scores = np.einsum("qk,qmk->qm", qr, rows.reshape(*ids.shape, self.bits))
        return np.where(np.asarray(ids) >= 0, scores, -np.inf).astype(np.float32)

    def search_reranked(
        self, query_codes: np.ndarray, query_relaxed: np.ndarray, k: int, *, factor: int = 4,
        nprobe: int | None = None, filter: SearchFilter | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The Hamming top ``k * factor`` (:meth:`search_stable`, with ``filter``) re-ordered by
        :meth:`relaxed_scores`, best first (equal scores keep the Hamming order), cut to k:
        ``(hamming distances, ids, scores)``. What it buys and costs: docs/BENCHMARKS.md."""
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        D, I = self.search_stable(query_codes, k * factor, nprobe=nprobe, filter=filter)
        S = self.relaxed_scores(query_relaxed, I)
        order = np.argsort(-S, axis=1, kind="stable")[:, :k]
        return (np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1),
                np.take_along_axis(S, order, axis=1))

    # ---------------------------------------------------------------------------------------
    # Radius search

    def range_search(
        self, query_codes: np.ndarray, radius: int, *, nprobe: int | None = None,
        batch_size: int = 1024, filter: SearchFilter | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every item within Hamming distance ``radius`` (inclusive) of each query.

        Returns ``(lims, distances, ids)`` in FAISS's layout: query i's results are
        ``[lims[i]:lims[i+1]]``, sorted by (distance, id). Exact for flat, exact for multihash up
        to its pigeonhole radius (larger radii are refused: the result would silently miss
        items), approximate for ivf (``nprobe`` lists probed, default :attr:`nprobe`; FAISS takes
        no search parameters here, so concurrent IVF range searches take turns on each shard).
        """
        self._shards()
        nprobe = self._nprobe(nprobe)
        return self._range(as_packed(query_codes, self.bits), radius, nprobe, batch_size, self._masks(filter))

    def _range(self, q: np.ndarray, radius: int, nprobe: int | None, batch_size: int, masks: list):
        indexes = self._shards()
        exact_r = self.manifest.index.exact_radius(self.bits)
        if self.index_type == "multihash" and radius > exact_r:
            raise ValueError(
                f"radius {radius} exceeds what this multihash index searches exactly ({exact_r} = "
                "nhash * (nflip + 1) - 1); rebuild with a larger mh_nflip or use a flat index"
            )
        lims_all, D_all, I_all = [np.zeros(1, dtype=np.int64)], [], []
        for start in range(0, len(q), batch_size):
            qb = q[start:start + batch_size]
            nqb = len(qb)
            qidx, dists, ids = [], [], []
            for s, ix in enumerate(indexes):
                # FAISS's binary range search keeps distance < radius: ask for radius + 1.
                lims, d, i = self._range_one(s, ix, qb, radius + 1, nprobe)
                counts = np.diff(lims.astype(np.int64))
                qi, d, i = np.repeat(np.arange(nqb), counts), d.astype(np.int32), self._to_ids(s, i.astype(np.int64))
                allowed, _, view = masks[s]
                if allowed is not None:  # deleted or filtered out: dropped here
                    pos, found = view.positions_of(i)
                    keep = found & allowed[pos]
                    qi, d, i = qi[keep], d[keep], i[keep]
                qidx.append(qi)
                dists.append(d)
                ids.append(i)
            qidx, dists, ids = np.concatenate(qidx), np.concatenate(dists), np.concatenate(ids)
            order = np.lexsort((ids, dists, qidx))
            D_all.append(dists[order])
            I_all.append(ids[order])
            lims_all.append(lims_all[-1][-1] + np.cumsum(np.bincount(qidx, minlength=nqb)))
        return (np.concatenate(lims_all), np.concatenate(D_all) if D_all else np.zeros(0, np.int32),
                np.concatenate(I_all) if I_all else np.zeros(0, np.int64))

    def _range_one(self, s: int, ix, q: np.ndarray, radius: int, nprobe: int | None):
        if nprobe is None:
            return ix.range_search(q, radius)
        # IndexBinaryIVF.range_search refuses search parameters (FAISS 1.15: "search params not
        # supported for this index"), so nprobe goes in through the shard's attribute, set and
        # used under the shard's lock. k-NN searches pass parameters and never read it.
        with self._nprobe_locks[s]:
            ix.nprobe = nprobe
            return ix.range_search(q, radius)


def _check_nprobe(nprobe: int, manifest: IndexManifest, where: str) -> int:
    if manifest.index.index_type != "ivf":
        raise ValueError(f"{where}: nprobe applies to ivf indexes, this one is {manifest.index.index_type}")
    nlist = manifest.index.nlist
    if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or not 1 <= nprobe <= nlist:
        raise ValueError(f"{where}: nprobe must be an integer from 1 to nlist = {nlist}, got {nprobe!r}")
    return int(nprobe)


def _sort_rows(D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (distance, id), missing results (-1) last."""
    key_id = np.where(I < 0, np.iinfo(np.int64).max, I)
    order = np.lexsort((key_id, D), axis=-1)
    return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)


# ------------------------------------------------------------------------------------------
# Loading one shard


def _load_shard(
    manifest_uri: str, i: int, entry: ShardEntry, manifest: IndexManifest, s3_endpoint: str | None,
    verify: str, known: dict | None, mmap: bool, cache_dir: str,
) -> _Shard:
    """Check and read shard ``i``. ``known``: its file's identity from a ``"once"`` record."""
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
        identity = _identity(local, entry)  # before hashing: a change after it shows in it
        if _needs_hash(verify, identity, known):
            digest, _ = sha256_stream(fs, path)
            _check_digest(where, digest, entry)
    else:
        os.makedirs(cache_dir, exist_ok=True)
        local = os.path.join(cache_dir, f"{entry.sha256}.faissindex")
        if os.path.exists(local):
            identity = _identity(local, entry)
            if identity["size"] != entry.bytes or (
                    _needs_hash(verify, identity, known)
                    and sha256_stream(pafs.LocalFileSystem(), local)[0] != entry.sha256):
                os.remove(local)  # a bad cached copy: fetch again
        if not os.path.exists(local):
            # Named per thread too: two shards with the same content download side by side.
            tmp = f"{local}.part-{os.getpid()}-{threading.get_ident()}"
            try:
                digest, _ = sha256_stream(fs, path, copy_to=tmp)
                _check_digest(where, digest, entry)
                os.replace(tmp, local)
            except BaseException:
                if os.path.exists(tmp):  # a failed or bad download is never kept
                    os.remove(tmp)
                raise
            identity = _identity(local, entry)
    index, mmapped = _read_index(local, where, mmap)
    if index.d != manifest.bits:
        raise ManifestError(f"{where}: index has {index.d}-bit codes, manifest says {manifest.bits}")
    if index.ntotal != entry.rows:
        raise ManifestError(f"{where}: index holds {index.ntotal} codes, manifest says {entry.rows}")
    deleted = np.zeros(0, np.int64)
    if entry.tombstones:
        deleted = read_side_array(manifest_uri, entry.tombstones, s3_endpoint, f"{where} tombstones")
        if deleted.dtype != np.int64 or deleted.ndim != 1 or len(deleted) != entry.deleted:
            raise ManifestError(f"{where} tombstones: {deleted.shape} {deleted.dtype}, manifest says "
                                f"{entry.deleted} int64 ids")
    labels = None
    if entry.labels:
        labels = read_side_array(manifest_uri, entry.labels, s3_endpoint, f"{where} labels")
        width = -(-(manifest.num_classes or 0) // 8)
        if labels.dtype != np.uint8 or labels.shape != (entry.rows, width):
            raise ManifestError(f"{where} labels: {labels.shape} {labels.dtype}, expected ({entry.rows}, "
                                f"{width}) uint8 for {manifest.num_classes} classes")
    relaxed = None
    if entry.relaxed:
        relaxed = functools.partial(read_side_array, manifest_uri, entry.relaxed, s3_endpoint, f"{where} relaxed",
                                    mmap=True)
    view = ShardView(index, entry, deleted=deleted, labels=labels, relaxed=relaxed)
    return _Shard(index, mmapped, identity if verify == "once" else None, view)


def read_side_array(manifest_uri: str, side: dict, s3_endpoint: str | None, where: str, *,
                    mmap: bool = False) -> np.ndarray:
    """A shard's side file (tombstones, labels, relaxed codes), checked against its manifest
    record; ``mmap``: a local file is hashed as a stream and then memory-mapped, not read."""
    import io

    uri = resolve_shard_uri(manifest_uri, side["uri"])
    fs, path = resolve_filesystem(uri, s3_endpoint)
    if mmap and isinstance(fs, pafs.LocalFileSystem):
        try:
            digest, size = sha256_stream(fs, path)
        except FileNotFoundError as e:
            raise ManifestError(f"{where}: {uri} missing") from e
        if size != side["bytes"] or digest != side["sha256"]:
            raise ManifestError(f"{where}: {uri} does not match the manifest's size and sha256; rebuild the index")
        return np.load(path, mmap_mode="r", allow_pickle=False)
    try:
        data = read_bytes(fs, path)
    except FileNotFoundError as e:
        raise ManifestError(f"{where}: {uri} missing") from e
    if len(data) != side["bytes"] or hashlib.sha256(data).hexdigest() != side["sha256"]:
        raise ManifestError(f"{where}: {uri} does not match the manifest's size and sha256; rebuild the index")
    return np.load(io.BytesIO(data), allow_pickle=False)


def _read_index(local: str, where: str, mmap: bool):
    """(index, whether it is memory-mapped); see :meth:`ShardedIndex.open` for what is mapped."""
    import faiss

    if mmap:
        try:
            return faiss.read_index_binary(local, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY), True
        except RuntimeError as e:
            logger.warning("%s: FAISS cannot read it memory-mapped (%s); reading it into memory",
                           where, str(e).splitlines()[0])
    try:
        return faiss.read_index_binary(local), False
    except RuntimeError as e:
        raise ManifestError(f"{where}: FAISS cannot read it ({str(e).splitlines()[0]})") from e


def _needs_hash(verify: str, identity: dict, known: dict | None) -> bool:
    return verify == "always" or (verify == "once" and identity != known)


def _check_digest(where: str, digest: str, entry: ShardEntry) -> None:
    if digest != entry.sha256:
        raise ManifestError(
            f"{where}: sha256 {digest[:16]}... does not match the manifest's {entry.sha256[:16]}...: "
            "the shard is corrupted or was replaced; rebuild the index"
        )


# ------------------------------------------------------------------------------------------
# "once": records of verified builds


def _identity(local: str, entry: ShardEntry) -> dict:
    """What a ``"once"`` record says of a shard file that matched ``entry.sha256``: any write
    through the filesystem, a replacement or a touch changes it (see ShardedIndex.open)."""
    st = os.stat(local)
    return {"path": os.path.abspath(local), "sha256": entry.sha256, "size": st.st_size,
            "inode": st.st_ino, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _record_path(cache_dir: str, manifest_uri: str, manifest: IndexManifest) -> str:
    """One record per manifest location and content: another build, an edited manifest or a
    copy of the index elsewhere has its own."""
    key = hashlib.sha256(f"{manifest_uri}\n{manifest.to_json()}".encode()).hexdigest()
    return os.path.join(cache_dir, "verified", f"{manifest.build_id or 'no-build-id'}.{key}.json")


def _read_record(path: str, n_shards: int) -> list[dict | None]:
    """The recorded identity of each shard's file; None for each where there is no usable record
    (then every shard is hashed)."""
    try:
        with open(path) as f:
            shards = json.load(f)["shards"]
    except FileNotFoundError:
        return [None] * n_shards
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("%s: unreadable verification record (%s); verifying every shard", path, e)
        return [None] * n_shards
    if not isinstance(shards, list) or len(shards) != n_shards:
        logger.warning("%s: verification record does not match the manifest; verifying every shard", path)
        return [None] * n_shards
    return shards


def _write_record(path: str, manifest_uri: str, manifest: IndexManifest, identities: list[dict]) -> None:
    """Written only after every shard checked out; atomically. A cache directory that cannot be
    written costs the next open a full verification, nothing else."""
    body = {"manifest": manifest_uri, "build_id": manifest.build_id,
            "verified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "shards": identities}
    try:
        write_text_atomic(pafs.LocalFileSystem(), path, json.dumps(body, indent=1))
    except OSError as e:
        logger.warning("%s: cannot record the verification (%s); the next open verifies again", path, e)


def brute_force_search(
    query_packed: np.ndarray, db_packed: np.ndarray, db_ids: Sequence[int], k: int, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Reference k-NN by a numpy Hamming scan, ranked by (distance, id). For tests and checks."""
    from dcgh_dist.codes import hamming_distances_packed

    db_ids = np.asarray(db_ids, dtype=np.int64)
    order_ids = np.argsort(db_ids, kind="stable")
    db_sorted, ids_sorted = db_packed[order_ids], db_ids[order_ids]
    k_eff = min(k, len(ids_sorted))
    outD, outI = [], []
    for s in range(0, len(query_packed), chunk):
        d = hamming_distances_packed(query_packed[s:s + chunk], db_sorted)
        o = np.argsort(d, axis=1, kind="stable")[:, :k_eff]
        outD.append(np.take_along_axis(d, o, axis=1))
        outI.append(ids_sorted[o])
    return np.concatenate(outD), np.concatenate(outI)
