"""One build at a time per index directory, on local filesystems: an exclusive lock file.

``OUTPUT/build.lock`` is created with ``O_CREAT | O_EXCL`` and holds the build id, host, pid, the
process's create time and the start time; it is removed when the build ends, however it ends. A
second build into the same directory finds it and refuses at once, naming the first. A lock left
by a process that died (same host; the pid is gone, or now belongs to a process with another
create time) is taken over with a warning. A lock from another host cannot be checked and is
refused: remove it by hand once that build is known to be gone.

Object stores have no exclusive create through pyarrow, so there (and as a second guard here)
:func:`dcgh_dist.index.build.build_index` re-reads the manifest just before it commits and refuses
to overwrite one that another build wrote meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from dcgh_dist.index.manifest import BuildConflictError

logger = logging.getLogger(__name__)

LOCK_NAME = "build.lock"
# A holder writes its lock right after creating it; an empty or partial one is re-read this long
# before it is called unreadable.
_WRITE_GRACE_S = 2.0


def _process_create_time(pid: int) -> float | None:
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p.create_time()
    except psutil.Error:
        return None


def _holder_alive(holder: dict[str, Any]) -> bool:
    """Is the process that wrote this lock (on this host) still running? A recorded pid can be
    reused by an unrelated process, so it must also have the recorded create time."""
    created = _process_create_time(holder["pid"])
    return created is not None and abs(created - holder["pid_create_time"]) < 1e-3


def _describe(holder: dict[str, Any]) -> str:
    return (f"build {holder.get('build_id')} (pid {holder.get('pid')} on {holder.get('host')}, "
            f"since {holder.get('since')})")


def _read_lock(path: str) -> tuple[str | None, dict[str, Any] | None]:
    """(text, parsed holder) of the lock file; (None, None) when it is gone, (text, None) when
    it is not (yet) a complete record."""
    deadline = time.monotonic() + _WRITE_GRACE_S
    while True:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            holder = None
        if (isinstance(holder, dict) and isinstance(holder.get("host"), str)
                and isinstance(holder.get("pid"), int)
                and isinstance(holder.get("pid_create_time"), (int, float))):
            return text, holder
        if time.monotonic() > deadline:
            return text, None
        time.sleep(0.05)


@contextlib.contextmanager
def build_lock(root: str, build_id: str, where: str) -> Iterator[None]:
    """Hold ``root/build.lock`` (``root``: a local directory, created if missing) for the block."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, LOCK_NAME)
    me = {
        "build_id": build_id, "host": socket.gethostname(), "pid": os.getpid(),
        "pid_create_time": _process_create_time(os.getpid()),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    mine = json.dumps(me)
    # Each pass either creates the lock or removes one stale lock; a few passes cover builds
    # that start at the same moment and race for the same stale lock.
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_if_stale(path, where)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(mine)
        break
    else:
        raise BuildConflictError(
            f"{where}: could not take the build lock {path}: other builds keep taking it"
        )
    try:
        yield
    finally:
        text, _ = _read_lock(path)
        if text == mine:
            os.remove(path)
        else:
            logger.warning("%s: the build lock %s no longer holds build %s; left as it is",
                           where, path, build_id)


def _take_over_if_stale(path: str, where: str) -> None:
    """Remove the lock at ``path`` if its holder is dead; raise naming it if not."""
    text, holder = _read_lock(path)
    if text is None:
        return  # released meanwhile
    if holder is None:
        raise BuildConflictError(
            f"{where}: the build lock {path} is unreadable ({text[:200]!r}); if no build is "
            "running into this index, remove it"
        )
    if holder["host"] != socket.gethostname():
        raise BuildConflictError(
            f"{where}: another build is running into this index: {_describe(holder)}; wait for it "
            f"or build into another --output. Its host cannot be checked from here: if that build "
            f"is gone, remove {path}"
        )
    if _holder_alive(holder):
        raise BuildConflictError(
            f"{where}: another build is running into this index: {_describe(holder)}; wait for it "
            "or build into another --output"
        )
    # Removed only if it is still the same dead holder's lock, not one a live build just took;
    # the narrow window left between this read and the remove is what the commit-time check in
    # build_index covers.
    again, _ = _read_lock(path)
    if again == text:
        logger.warning("%s: taking over the build lock of %s: that process is gone", where, _describe(holder))
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
