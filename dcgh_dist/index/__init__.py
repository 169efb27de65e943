"""Binary codes -> sharded FAISS indexes -> exact sharded search.

The bit convention lives in :mod:`dcgh_dist.codes`, code shards in :mod:`dcgh_dist.index.codes`; the manifest format in
:mod:`dcgh_dist.index.manifest`; building in :mod:`dcgh_dist.index.build`; appends are builds, deletes and
compaction in :mod:`dcgh_dist.index.update`; searching in :mod:`dcgh_dist.index.search`, with
filters and tombstones in :mod:`dcgh_dist.index.filters`; ranking metrics over an index in :mod:`dcgh_dist.index.evaluate`.
See docs/INDEX.md.
"""

from dcgh_dist.codes import (
    BIT_ORDER,
    as_packed,
    hamming_distances_packed,
    pack_codes,
    unpack_codes,
)
from dcgh_dist.index.filters import SearchFilter
from dcgh_dist.index.manifest import (
    BuildConflictError,
    IndexConfig,
    IndexManifest,
    ManifestError,
    read_manifest,
)
from dcgh_dist.index.search import ShardedIndex, brute_force_search

__all__ = [
    "BIT_ORDER",
    "BuildConflictError",
    "IndexConfig",
    "IndexManifest",
    "ManifestError",
    "SearchFilter",
    "ShardedIndex",
    "as_packed",
    "brute_force_search",
    "hamming_distances_packed",
    "pack_codes",
    "read_manifest",
    "unpack_codes",
]
