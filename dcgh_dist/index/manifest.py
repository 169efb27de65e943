"""The index manifest: one JSON file that says what a sharded index is and where its shards are.

Written last and atomically by the builder, so a reader that finds a manifest finds every shard it
names. Layout (``format = dcgh-dist-index-v1``)::

    {
      "format": "dcgh-dist-index-v1",
      "bits": 64, "bit_order": "...",            # see dcgh_dist.codes
      "index": {IndexConfig fields},             # type and parameters (nlist, nprobe, ...)
      "exact": true,                             # k-NN equals a brute-force scan
      "num_items": 1000000,
      "model_fingerprint": "ab12...",            # weights hash of the checkpoint (or null)
      "modality": "image",
      "config": {...},                           # the checkpoint's Config tree (or null)
      "codes_uri": "...", "build_id": "...", "created": "2025-...Z",
      "version": 3, "parent": "<previous build_id>",   # every commit is a new version
      "operation": "append",                          # build | append | delete | compact
      "num_live": 999000,                             # num_items less the deleted ones
      "num_classes": 80,                              # where the shards carry labels (or null)
      "retained_builds": ["<build_id>", "<older build_id>"],   # directories that may exist
      "versions": [                                   # the versions kept readable, newest first
        {"build_id": "<build_id>", "version": 3, "dirs": ["<build_id>", ...],
         "manifest": "manifest-<build_id>.json"}, ...],
      "shards": [
        {"uri": "shards/<build_id>/shard-00000.faissindex",   # relative: to the manifest's dir
         "rows": 250000, "id_min": 0, "id_max": 249999,
         "id_layout": "offset", "id_offset": 0,               # or "ids": the index holds the ids
         "sha256": "...", "bytes": 2000045,
         "tombstones": {"uri": "shards/<id>/tombstones-00000.npy", "count": 1000,
                        "sha256": "...", "bytes": 8128},      # deleted ids (or null)
         "labels": {"uri": "shards/<id>/labels-00000.npy", "sha256": "...", "bytes": 2500128},
         "relaxed": {"uri": "shards/<id>/relaxed-00000.npy", ...}}    # encode --relaxed (or null)
      ]
    }

Versions (docs/INDEX.md, "A live index"): a build, an append (new shards beside the old ones), a
delete (a new tombstone file for each shard that holds a deleted id; the shard itself is not
touched) and a compaction (shards with tombstones or below ``shard_size`` rewritten as full
ones) each commit a new manifest. Every version is also written as ``manifest-<build_id>.json``
beside ``manifest.json`` and never changed after, so a server pointed at it keeps reading that
version, and ``versions`` lists the ``keep_builds`` newest versions with the shard directories
each one reads: a commit deletes the directories no kept version reads, and nothing else.

``id_layout = "offset"``: the shard's ids are exactly ``id_offset .. id_offset + rows - 1`` in the
order the codes were added, so the bare FAISS index is stored (8 bytes per 64-bit code) and the
reader adds the offset to FAISS's positions. ``"ids"``: the index keeps the ids itself
(``IndexBinaryIDMap``, or the inverted lists of ``IndexBinaryIVF``), 8 more bytes per item.

Nothing read from a manifest may name a path outside the index it describes: the builder deletes
``shards/<id>/`` for ids in ``retained_builds`` and readers open the shard ``uri``s (and cache S3
shards under their ``sha256``), so :meth:`IndexManifest.from_json` refuses a build id that is not
one plain path component, a shard uri that is not a relative path below the manifest's directory
and a sha256 that is not 64 hex digits. ``codes_uri`` is provenance (where the codes were read
from, outside the index by nature): nothing here opens or deletes it.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import pyarrow.fs as pafs

from dcgh_dist.config import IndexConfig, config_section
from dcgh_dist.codes import BIT_ORDER
from dcgh_dist.storage import join, read_text, resolve_filesystem, write_text_atomic

MANIFEST_FORMAT = "dcgh-dist-index-v1"
MANIFEST_NAME = "manifest.json"
ID_LAYOUTS = ("offset", "ids")

# One path component that cannot climb out of ``shards/`` ("." and ".." start with a dot).
_BUILD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
OPERATIONS = ("build", "append", "delete", "compact")


class ManifestError(ValueError):
    """A manifest or shard that cannot be used; the message says which and why."""


class BuildConflictError(ManifestError):
    """Another build is writing, or has written, the same index while this one ran."""


def check_build_id(value: Any, where: str, what: str = "build_id") -> str:
    """``value`` if it is a build id that names one directory right under ``shards/``."""
    if not isinstance(value, str) or not _BUILD_ID.fullmatch(value):
        raise ManifestError(
            f"{where}: {what} {value!r} is not a build id (one path component of letters, digits, "
            "'.', '_', '-', starting with a letter or digit); refusing a manifest that could name "
            "a directory outside the index"
        )
    return value


def check_relative_uri(value: Any, where: str, what: str) -> str:
    """``value`` if it is a relative path that stays below the directory it is relative to."""
    problem = None
    if not isinstance(value, str) or not value:
        problem = "is not a non-empty string"
    elif "://" in value or value.startswith("/") or "\\" in value:
        problem = "is not a relative path (absolute paths, URI schemes and backslashes are refused)"
    elif any(seg in ("", ".", "..") for seg in value.split("/")):
        problem = "has an empty, '.' or '..' segment"
    if problem:
        raise ManifestError(
            f"{where}: {what} {value!r} {problem}; shard uris must be relative paths below the "
            "manifest's directory"
        )
    return value


def check_sha256(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ManifestError(f"{where}: sha256 {value!r} is not 64 lowercase hex digits")
    return value


def version_manifest_name(build_id: str) -> str:
    """The immutable copy of the manifest a commit wrote, beside ``manifest.json``."""
    return f"manifest-{build_id}.json"


@dataclass
class ShardEntry:
    uri: str
    rows: int
    id_min: int
    id_max: int
    id_layout: Literal["offset", "ids"]
    id_offset: int | None
    sha256: str
    bytes: int
    # Side files, each {"uri", "sha256", "bytes", ...}: the shard's deleted ids (a sorted int64
    # .npy, "count" of them) and its labels (a uint8 .npy of packed multi-hot rows in id order).
    tombstones: dict | None = None
    labels: dict | None = None
    relaxed: dict | None = None  # the relaxed codes (float16 (rows, bits), id order), for re-ranking

    @property
    def deleted(self) -> int:
        return int(self.tombstones["count"]) if self.tombstones else 0

    def side_files(self) -> list[dict]:
        return [f for f in (self.tombstones, self.labels, self.relaxed) if f]


def shard_dir(uri: str) -> str | None:
    """The build directory a file of the index lives in (``shards/<build_id>/...``), or None."""
    parts = uri.split("/")
    return parts[1] if len(parts) >= 3 and parts[0] == "shards" else None


@dataclass
class IndexManifest:
    bits: int
    index: IndexConfig
    shards: list[ShardEntry]
    model_fingerprint: str | None = None
    modality: str | None = None
    config: dict[str, Any] | None = None
    codes_uri: str = ""
    build_id: str = ""  # "" only in manifests written by hand: no build recorded
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    extra: dict[str, Any] = field(default_factory=dict)
    # Builds of this index whose shards/<id>/ directories may still exist, newest (build_id)
    # first: what the next rebuild may delete, and nothing else.
    retained_builds: list[str] = field(default_factory=list)
    version: int = 1
    parent: str = ""  # the build_id of the version this one was made from ("" for a first build)
    operation: str = "build"
    num_classes: int | None = None  # the width of the shards' labels, where they carry them
    # The versions kept readable, newest first: {"build_id", "version", "dirs", "manifest"}.
    versions: list[dict] = field(default_factory=list)

    @property
    def num_items(self) -> int:
        """Codes stored, deleted ones included (what the shard files hold)."""
        return sum(s.rows for s in self.shards)

    @property
    def num_deleted(self) -> int:
        return sum(s.deleted for s in self.shards)

    @property
    def num_live(self) -> int:
        """Codes a search can return."""
        return self.num_items - self.num_deleted

    def dirs(self) -> list[str]:
        """The build directories this version reads, in shard order."""
        out: list[str] = []
        for s in self.shards:
            for uri in [s.uri] + [f["uri"] for f in s.side_files()]:
                d = shard_dir(uri)
                if d and d not in out:
                    out.append(d)
        return out

    @property
    def exact(self) -> bool:
        return self.index.index_type == "flat"

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "bits": self.bits,
                "bit_order": BIT_ORDER,
                "index": asdict(self.index),
                "exact": self.exact,
                "num_items": self.num_items,
                "num_live": self.num_live,
                "num_classes": self.num_classes,
                "version": self.version,
                "parent": self.parent,
                "operation": self.operation,
                "model_fingerprint": self.model_fingerprint,
                "modality": self.modality,
                "config": self.config,
                "codes_uri": self.codes_uri,
                "build_id": self.build_id,
                "created": self.created,
                "extra": self.extra,
                "retained_builds": self.retained_builds,
                "versions": self.versions,
                "shards": [asdict(s) for s in self.shards],
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_NAME) -> "IndexManifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: not a dcgh-dist index manifest (not a JSON object)")
        if d.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{where}: not a dcgh-dist index manifest (format {d.get('format')!r})")
        if d.get("bit_order") != BIT_ORDER:
            raise ManifestError(
                f"{where}: codes use bit order {d.get('bit_order')!r}, this reader uses {BIT_ORDER!r}"
            )
        try:
            shards = [ShardEntry(**s) for s in d["shards"]]
            m = cls(
                bits=int(d["bits"]), index=config_section(IndexConfig, d["index"], "index"), shards=shards,
                model_fingerprint=d.get("model_fingerprint"), modality=d.get("modality"),
                config=d.get("config"), codes_uri=d.get("codes_uri", ""),
                build_id=d.get("build_id", ""), created=d.get("created", ""),
                extra=d.get("extra", {}), version=int(d.get("version", 1)), parent=d.get("parent", ""),
                operation=d.get("operation", "build"), num_classes=d.get("num_classes"),
                versions=d.get("versions", []),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{where}: malformed manifest ({e})") from e
        if not isinstance(m.codes_uri, str):
            raise ManifestError(f"{where}: codes_uri {m.codes_uri!r} is not a string")
        for i, s in enumerate(m.shards):
            check_relative_uri(s.uri, where, f"shard {i} uri")
            check_sha256(s.sha256, f"{where}: shard {i}")
            if s.id_layout not in ID_LAYOUTS:
                raise ManifestError(
                    f"{where}: shard {i}: id_layout {s.id_layout!r} is not one of {list(ID_LAYOUTS)}"
                )
            for name in ("tombstones", "labels", "relaxed"):
                side = getattr(s, name)
                if side is None:
                    continue
                if not isinstance(side, dict) or not {"uri", "sha256", "bytes"} <= set(side):
                    raise ManifestError(f"{where}: shard {i}: {name} {side!r} needs uri, sha256 and bytes")
                check_relative_uri(side["uri"], where, f"shard {i} {name} uri")
                check_sha256(side["sha256"], f"{where}: shard {i} {name}")
            if s.tombstones is not None and not 0 <= s.deleted <= s.rows:
                raise ManifestError(f"{where}: shard {i}: {s.deleted} tombstones for {s.rows} rows")
        if m.operation not in OPERATIONS:
            raise ManifestError(f"{where}: operation {m.operation!r} is not one of {list(OPERATIONS)}")
        if m.parent:
            check_build_id(m.parent, where, "parent")
        if not isinstance(m.versions, list):
            raise ManifestError(f"{where}: versions {m.versions!r} is not a list")
        for v in m.versions:
            if not isinstance(v, dict) or not isinstance(v.get("dirs"), list):
                raise ManifestError(f"{where}: versions entry {v!r} needs build_id, dirs and manifest")
            check_build_id(v.get("build_id"), where, "versions entry build_id")
            for b in v["dirs"]:
                check_build_id(b, where, "versions entry dir")
            if v.get("manifest") != version_manifest_name(v["build_id"]):
                raise ManifestError(f"{where}: versions entry {v['build_id']}: manifest {v.get('manifest')!r} "
                                    f"is not {version_manifest_name(v['build_id'])!r}")
        if m.build_id != "":
            check_build_id(m.build_id, where)
        if "retained_builds" in d:
            m.retained_builds = d["retained_builds"]
            if not isinstance(m.retained_builds, list):
                raise ManifestError(f"{where}: retained_builds {m.retained_builds!r} is not a list")
        elif m.build_id:
            # Manifests from before retention: only their own build's shards are known.
            m.retained_builds = [m.build_id]
        for b in m.retained_builds:
            check_build_id(b, where, "retained_builds entry")
        if len(set(m.retained_builds)) != len(m.retained_builds):
            raise ManifestError(f"{where}: retained_builds {m.retained_builds} names a build twice")
        if m.build_id and m.retained_builds[:1] != [m.build_id]:
            raise ManifestError(
                f"{where}: retained_builds {m.retained_builds} must start with this manifest's "
                f"build_id {m.build_id!r}"
            )
        if d.get("num_items") is not None and d["num_items"] != m.num_items:
            raise ManifestError(
                f"{where}: num_items {d['num_items']} != sum of shard rows {m.num_items}"
            )
        return m


def manifest_location(uri: str) -> str:
    """An index directory or manifest URI -> the manifest's URI."""
    return uri if uri.endswith(".json") else join(uri, MANIFEST_NAME)


def resolve_shard_uri(manifest_uri: str, shard_uri: str) -> str:
    """A shard's URI: relative to the manifest's directory, and refused unless it stays below it
    (checked here too, for manifests built in code rather than read)."""
    check_relative_uri(shard_uri, manifest_uri, "shard uri")
    return join(manifest_uri.rsplit("/", 1)[0], shard_uri)


def read_manifest(uri: str, s3_endpoint: str | None = None) -> IndexManifest:
    uri = manifest_location(uri)
    fs, path = resolve_filesystem(uri, s3_endpoint)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise ManifestError(f"{uri}: no index manifest there (build one with jobs/build_index.py)")
    return IndexManifest.from_json(read_text(fs, path), where=uri)


def write_manifest(uri: str, manifest: IndexManifest, s3_endpoint: str | None = None) -> str:
    """Write atomically (temp file + rename locally; a single PUT on S3). Returns its URI."""
    uri = manifest_location(uri)
    fs, path = resolve_filesystem(uri, s3_endpoint)
    write_text_atomic(fs, path, manifest.to_json())
    return uri
