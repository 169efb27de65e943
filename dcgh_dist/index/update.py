"""Changing a built index in place: delete ids (tombstones) and compact. Appends are builds
(:func:`dcgh_dist.index.build.build_index` with ``append=True``).

Each operation takes the index's build lock, reads the current manifest, writes only new files
(under ``shards/<its build id>/``) and commits a new manifest version through
:func:`dcgh_dist.index.build.commit`: a server holding the previous version keeps reading files
that are still there, and ``keep_builds`` versions stay openable.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from dcgh_dist.config import IndexConfig
from dcgh_dist.index.build import (
    SHARD_SUFFIX,
    commit,
    index_lock,
    join,
    new_build_id,
    read_current,
    side_uri,
    trained_quantizer,
    write_shard,
    write_side_file,
)
from dcgh_dist.index.manifest import IndexManifest, ShardEntry, manifest_location

logger = logging.getLogger(__name__)


@dataclass
class DeleteResult:
    requested: int
    deleted: int  # newly tombstoned
    already_deleted: int
    not_found: int
    not_found_examples: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_id_list(uri: str, s3_endpoint: str | None = None) -> np.ndarray:
    """The ``id`` column of a Parquet file (or a directory of them): the ids to delete."""
    import pyarrow.parquet as pq

    from dcgh_dist.data.format import list_data_files
    from dcgh_dist.storage import resolve_filesystem

    fs, path = resolve_filesystem(uri, s3_endpoint)
    paths = [path] if path.endswith(".parquet") else list_data_files(uri, s3_endpoint)
    out = []
    for p in paths:
        t = pq.read_table(p, filesystem=fs)
        if "id" not in t.column_names:
            raise ValueError(f"{p}: needs an 'id' column (int64) of the ids to delete, has {t.column_names}")
        col = t.column("id")
        if col.null_count:
            raise ValueError(f"{p}: column 'id' has {col.null_count} null(s)")
        out.append(col.to_numpy().astype(np.int64))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def delete_ids(index_uri: str, ids, *, keep_builds: int | None = None,
               s3_endpoint: str | None = None) -> tuple[IndexManifest, DeleteResult]:
    """Tombstone ``ids`` in the index at ``index_uri``: a new version whose searches never return
    them. Ids not in the index are counted (and a few named), not an error; when nothing new is
    deleted no version is written. Returns (the current manifest, the counts)."""
    from dcgh_dist.index.search import ShardedIndex, read_side_array

    t0 = time.time()
    build_id = new_build_id()
    man_uri = manifest_location(index_uri)
    want = np.unique(np.asarray(ids, dtype=np.int64))
    with index_lock(man_uri, build_id, s3_endpoint):
        previous = read_current(man_uri, s3_endpoint, required=True)
        base = man_uri.rsplit("/", 1)[0]
        shards = list(previous.shards)
        touching = [i for i, e in enumerate(shards) if e.rows and np.any((want >= e.id_min) & (want <= e.id_max))]
        found = np.zeros(0, np.int64)
        already = np.zeros(0, np.int64)
        new_total = 0
        if touching:
            with ShardedIndex.open(man_uri, s3_endpoint=s3_endpoint, shards=touching, verify="never") as index:
                for j, i in enumerate(touching):
                    e = shards[i]
                    cand = want[(want >= e.id_min) & (want <= e.id_max)]
                    _, here = index.view(j).positions_of(cand)
                    hit = cand[here]
                    old = (read_side_array(man_uri, e.tombstones, s3_endpoint, f"shard {i} tombstones")
                           if e.tombstones else np.zeros(0, np.int64))
                    fresh = np.setdiff1d(hit, old)
                    already = np.union1d(already, np.intersect1d(hit, old))
                    found = np.union1d(found, fresh)
                    if fresh.size:
                        tomb = np.union1d(old, fresh)
                        rel = side_uri(f"shards/{build_id}/shard-{i:05d}{SHARD_SUFFIX}", "tombstones")
                        shards[i] = dataclasses.replace(e, tombstones=write_side_file(
                            join(base, rel), rel, tomb, s3_endpoint, count=int(tomb.size)))
                        new_total += int(fresh.size)
        # An id deleted in one shard and live in another (deleted, then appended again) counts
        # as deleted now: it is the live copy that went.
        already = np.setdiff1d(already, found)
        missing = np.setdiff1d(want, np.union1d(found, already))
        result = DeleteResult(requested=int(want.size), deleted=new_total, already_deleted=int(already.size),
                              not_found=int(missing.size), not_found_examples=missing[:10].tolist())
        if missing.size:
            logger.warning("%s: %d of %d ids to delete are not in the index (e.g. %s)", man_uri, missing.size,
                           want.size, missing[:10].tolist())
        if not new_total:
            logger.info("%s: nothing new to delete; no new version written", man_uri)
            return previous, result
        manifest = dataclasses.replace(previous, shards=shards, build_id=build_id, operation="delete",
                                       index=_with_keep(previous.index, keep_builds),
                                       created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                       extra={"build_seconds": round(time.time() - t0, 3), **result.to_dict()})
        return commit(man_uri, previous, manifest, s3_endpoint, t0), result


def compact_index(index_uri: str, *, shard_size: int | None = None, keep_builds: int | None = None,
                  s3_endpoint: str | None = None) -> IndexManifest:
    """Rewrite the shards that hold tombstones or fewer than ``shard_size`` codes (small appends)
    as full shards of their live items; full shards without tombstones are left as they are.
    A new version; the old shards stay for ``keep_builds`` versions, as after any commit."""
    import faiss

    from dcgh_dist.index.search import ShardedIndex

    t0 = time.time()
    build_id = new_build_id()
    man_uri = manifest_location(index_uri)
    with index_lock(man_uri, build_id, s3_endpoint):
        previous = read_current(man_uri, s3_endpoint, required=True)
        cfg = _with_keep(previous.index, keep_builds)
        if shard_size is not None:
            cfg = dataclasses.replace(cfg, shard_size=shard_size)
        redo = [i for i, e in enumerate(previous.shards) if e.deleted or e.rows < cfg.shard_size]
        if not any(previous.shards[i].deleted for i in redo) and len(redo) <= 1:
            logger.info("%s: no tombstones and at most one partial shard; nothing to compact", man_uri)
            return previous
        base = man_uri.rsplit("/", 1)[0]
        trained = trained_quantizer(man_uri, previous, s3_endpoint) if cfg.index_type == "ivf" else None
        with ShardedIndex.open(man_uri, s3_endpoint=s3_endpoint, shards=redo, verify="always") as index:
            parts = [index.view(j).live_contents() for j in range(len(redo))]
        ids = np.concatenate([p[0] for p in parts])
        codes = np.concatenate([p[1] for p in parts])
        labels = np.concatenate([p[2] for p in parts]) if previous.num_classes else None
        relaxed = np.concatenate([p[3] for p in parts]) if all(p[3] is not None for p in parts) else None
        order = np.argsort(ids, kind="stable")
        ids, codes = ids[order], codes[order]
        labels = labels[order] if labels is not None else None
        relaxed = relaxed[order] if relaxed is not None else None
        new: list[ShardEntry] = []
        for n, start in enumerate(range(0, len(ids), cfg.shard_size)):
            sl = slice(start, start + cfg.shard_size)
            rel = f"shards/{build_id}/shard-{n:05d}{SHARD_SUFFIX}"
            new.append(write_shard(ids[sl], codes[sl], previous.bits, cfg, join(base, rel), rel, trained=trained,
                                   s3_endpoint=s3_endpoint, threads=faiss.omp_get_max_threads(),
                                   labels=labels[sl] if labels is not None else None, where=man_uri,
                                   relaxed=relaxed[sl] if relaxed is not None else None))
        kept = [e for i, e in enumerate(previous.shards) if i not in set(redo)]
        manifest = dataclasses.replace(
            previous, shards=kept + new, build_id=build_id, operation="compact", index=cfg,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            extra={"build_seconds": round(time.time() - t0, 3), "shards_rewritten": len(redo),
                   "shards_written": len(new), "tombstones_folded": sum(previous.shards[i].deleted for i in redo)})
        return commit(man_uri, previous, manifest, s3_endpoint, t0)


def _with_keep(cfg: IndexConfig, keep_builds: int | None) -> IndexConfig:
    return cfg if keep_builds is None else dataclasses.replace(cfg, keep_builds=keep_builds)
