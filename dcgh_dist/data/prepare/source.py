"""Reading a raw input tree (local directory or S3 prefix) through one pyarrow filesystem.

Every layout reads its files through :class:`InputTree`, so local paths and ``s3://`` URIs take the
same code path. Text files are read as bytes and split on ``\\n`` only (``\\r`` stripped, a UTF-8
BOM dropped): Windows line endings are fine, and a tag that happens to contain another Unicode
line separator does not shift the lines. Decoding to ``str`` is left to the caller, per line, so a
single bad line can be skipped and counted instead of failing the file.
"""

from __future__ import annotations

import logging
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import pyarrow.fs as pafs

from dcgh_dist.storage import join, resolve_filesystem

logger = logging.getLogger(__name__)

_BOM = b"\xef\xbb\xbf"
_BLOCK = 8 << 20  # bytes read at a time when streaming a big text file


def is_missing_error(e: BaseException) -> bool:
    """Whether a pyarrow/OS error means "no such file" (local: FileNotFoundError; S3: a message)."""
    if isinstance(e, FileNotFoundError):
        return True
    msg = str(e)
    return "does not exist" in msg or "NoSuchKey" in msg or "Not Found" in msg or "404" in msg


class InputTree:
    """A root (directory or ``s3://`` prefix) and relative paths under it."""

    def __init__(self, uri: str, s3_endpoint: str | None = None):
        self.uri = uri.rstrip("/") or "/"
        self.s3_endpoint = s3_endpoint
        self.fs, self.root = resolve_filesystem(uri, s3_endpoint)

    def __repr__(self) -> str:
        return f"InputTree({self.uri!r})"

    def sub(self, rel: str) -> "InputTree":
        return InputTree(self.display(rel), self.s3_endpoint)

    def path(self, rel: str) -> str:
        """The filesystem path of ``rel`` (what pyarrow calls take)."""
        return join(self.root, rel) if rel else self.root

    def display(self, rel: str) -> str:
        """``rel`` as the user would write it (for messages)."""
        return f"{self.uri}/{rel.strip('/')}" if rel else self.uri

    def _type(self, rel: str) -> pafs.FileType:
        return self.fs.get_file_info(self.path(rel)).type

    def exists(self) -> bool:
        return self._type("") != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self._type(rel) == pafs.FileType.File

    def is_dir(self, rel: str) -> bool:
        return self._type(rel) == pafs.FileType.Directory

    def list_files(self, rel: str = "", recursive: bool = False) -> list[tuple[str, int]]:
        """``(name relative to rel, size)`` of the files under ``rel``, sorted by name."""
        base = self.path(rel).rstrip("/")
        sel = pafs.FileSelector(base, recursive=recursive, allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(sel):
            if info.type == pafs.FileType.File:
                out.append((info.path[len(base) + 1:], int(info.size or 0)))
        out.sort()
        return out

    def list_dirs(self, rel: str = "") -> list[str]:
        base = self.path(rel).rstrip("/")
        sel = pafs.FileSelector(base, recursive=False, allow_not_found=True)
        return sorted(i.path[len(base) + 1:] for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.Directory)

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except OSError as e:
            if is_missing_error(e):
                raise FileNotFoundError(f"{self.display(rel)}: no such file") from e
            raise OSError(f"{self.display(rel)}: cannot read ({e})") from e

    def iter_lines(self, rel: str) -> Iterator[bytes]:
        """The lines of a text file as bytes, streamed (for files of hundreds of MB).

        ``\\r`` before ``\\n`` is removed, a leading BOM dropped, and the empty string after a
        final newline is not a line.
        """
        try:
            stream = self.fs.open_input_stream(self.path(rel))
        except OSError as e:
            if is_missing_error(e):
                raise FileNotFoundError(f"{self.display(rel)}: no such file") from e
            raise
        with stream:
            rest = b""
            first = True
            while True:
                block = stream.read(_BLOCK)
                if not block:
                    break
                if first:
                    block = block[len(_BOM):] if block.startswith(_BOM) else block
                    first = False
                data = rest + block
                cut = data.rfind(b"\n")
                if cut < 0:
                    rest = data
                    continue
                # Whole lines at once, in C: files of hundreds of thousands of lines are common.
                rest = data[cut + 1:]
                yield from data[:cut + 1].replace(b"\r\n", b"\n")[:-1].split(b"\n")
            if rest:
                yield rest[:-1] if rest.endswith(b"\r") else rest

    def read_lines(self, rel: str) -> list[bytes]:
        """All lines of a (small enough) text file; the same rules as :meth:`iter_lines`."""
        data = self.read_bytes(rel)
        data = data[len(_BOM):] if data.startswith(_BOM) else data
        if not data:
            return []
        lines = data.replace(b"\r\n", b"\n").split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        elif lines[-1].endswith(b"\r"):
            lines[-1] = lines[-1][:-1]
        return lines

    def read_many(self, rels: Sequence[str], threads: int = 16) -> list[bytes | None]:
        """Many small files (tag files), in order; ``None`` for a missing one.

        Threads, because on S3 each file is one GET and the latency, not the CPU, is the cost.
        """
        def one(rel: str) -> bytes | None:
            try:
                return self.read_bytes(rel)
            except FileNotFoundError:
                return None

        if len(rels) < 64:
            return [one(r) for r in rels]
        # One task per block of files, not per file: 25,000 futures cost more than the reads.
        block = max(16, -(-len(rels) // (threads * 4)))
        blocks = [rels[i:i + block] for i in range(0, len(rels), block)]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return [data for part in pool.map(lambda b: [one(r) for r in b], blocks) for data in part]


def path_under(root: str, path: str) -> str | None:
    """``path``, read from a data file, as a path relative to the image root ``root``; ``None`` if
    it names a place outside it.

    A relative path must not climb out with ``..`` (``a/../b`` is fine, ``../b`` is not); an
    absolute one (``/data/x.jpg``, ``s3://bucket/x.jpg``) must lie under ``root`` on the same kind
    of storage. The test is on the names, as S3 has no other: a symbolic link inside a local
    image root is followed, as the user who made it meant it to be. Paths are returned as they
    are, but for the root's part of an absolute one (on S3, ``a//b`` and ``a/b`` are two keys).
    """
    if path.startswith(("s3://", "/")):
        on_s3 = root.startswith("s3://")
        if path.startswith("s3://") != on_s3:
            return None
        base = (root[len("s3://"):] if on_s3 else os.path.abspath(root.removeprefix("file://"))).rstrip("/")
        # (an S3 key is not normalised: there, "a/../b" is a name of its own, checked below)
        full = path[len("s3://"):] if on_s3 else posixpath.normpath(path)
        if not full.startswith(base + "/"):
            return None
        path = full[len(base) + 1:]
    depth = 0
    for part in path.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return None
        elif part not in ("", "."):
            depth += 1
    return path


def decode_utf8(line: bytes) -> str | None:
    """``line`` as text, or ``None`` if it is not UTF-8 (the caller skips and counts it)."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return None


def normalize_text(text: str) -> str:
    """Collapse runs of whitespace (newlines, tabs) into single spaces and strip the ends."""
    return " ".join(text.split())


def require_file(tree: InputTree, rel: str, what: str) -> None:
    """FileNotFoundError naming the expected file (layout checks)."""
    if not tree.is_file(rel):
        raise FileNotFoundError(f"expected {what} at {tree.display(rel)}, which does not exist")


def require_dir(tree: InputTree, rel: str, what: str) -> None:
    if not tree.is_dir(rel):
        raise FileNotFoundError(f"expected {what} at {tree.display(rel)}/, which does not exist")
