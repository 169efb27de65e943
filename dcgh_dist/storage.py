"""Files on local disk or S3 through one code path: the ground floor every other layer uses.

A URI is a local path, ``file://...`` or ``s3://bucket/prefix``; ``s3_endpoint`` (e.g.
``http://127.0.0.1:9000``) points S3 at a compatible store (MinIO, moto), and credentials come
from the usual AWS environment variables and files. Functions take the pyarrow filesystem and
the path it names (``resolve_filesystem``), so a caller resolves once and reads or writes many files.

Writes are atomic: a reader sees the whole old file or the whole new one, never half of either.
Locally that is a write to a unique temporary name in the same directory and a rename (two
writers never share a temporary file); on S3 a single PUT or multipart upload appears whole.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import uuid
from typing import Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorageError(ValueError):
    """A URI that cannot be used; the message says which and why."""


def resolve_filesystem(uri: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path, ``file://`` URI or ``s3://bucket/prefix``."""
    if uri.startswith("s3://"):
        kwargs = {}
        if s3_endpoint:
            scheme, _, host = s3_endpoint.partition("://")
            if not host:
                scheme, host = "https", s3_endpoint
            kwargs.update(endpoint_override=host, scheme=scheme)
        return pafs.S3FileSystem(**kwargs), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def child_uri(uri: str, *parts: str) -> str:
    """A URI under ``uri`` in the form the user gave: ``s3://bucket/prefix/part``, or a local path
    made absolute (a job's outputs must not depend on where a later reader runs)."""
    if is_remote(uri):
        return join(uri, *parts)
    return os.path.join(resolve_filesystem(uri)[1], *parts)


def put_tree(local_dir: str, fs: pafs.FileSystem, base: str, *, last: tuple[str, ...] = ()) -> list[str]:
    """Copy every file under ``local_dir`` to ``base`` on ``fs``, each atomically; files named in
    ``last`` go after all others (a ``meta.json`` that makes a checkpoint loadable only once its
    weights are there). Returns the paths written."""
    files = sorted(os.path.relpath(os.path.join(d, f), local_dir) for d, _, names in os.walk(local_dir) for f in names)
    files.sort(key=lambda rel: os.path.basename(rel) in last)
    written = []
    for rel in files:
        with open(os.path.join(local_dir, rel), "rb") as f:
            write_bytes_atomic(fs, join(base, rel.replace(os.sep, "/")), f.read())
        written.append(join(base, rel.replace(os.sep, "/")))
    return written


def display(fs: pafs.FileSystem, path: str) -> str:
    """A filesystem path as the user would write it: ``s3://bucket/key`` or a local path."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(fs: pafs.FileSystem, path: str) -> str:
    return read_bytes(fs, path).decode("utf-8")


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data) -> None:
    """Write ``data`` (bytes or a buffer) so that readers see all of it or nothing."""
    parent = path.rsplit("/", 1)[0]
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            fs.move(tmp, path)
        except BaseException:
            try:
                fs.delete_file(tmp)
            except OSError:
                pass
            raise
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def write_text_atomic(fs: pafs.FileSystem, path: str, text: str) -> None:
    write_bytes_atomic(fs, path, text.encode("utf-8"))


def publish_dir(final: str, build: Callable[[str], None], *, marker: str | None = None,
                replace: bool = False) -> None:
    """Make the local directory ``final`` appear whole or not at all: ``build(staging)`` fills a
    private sibling, which is then renamed into place (a rename is atomic; a copy is not).
    Without ``replace`` a ``final`` that another process published first wins and the staging
    copy is dropped (caches, generated data): it counts as published only if it holds ``marker``
    (a file every complete directory has), else the failed rename is raised. With ``replace`` an
    existing ``final`` is swapped out and removed: the caller vouches that it is its own earlier
    output (``export_checkpoint`` reads its meta.json first). The staging directory never
    outlives the call."""
    final = os.path.abspath(final)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.", dir=parent)
    try:
        build(staging)
        if replace and os.path.isdir(final):
            old = f"{staging}.old"
            os.rename(final, old)
            os.rename(staging, final)
            shutil.rmtree(old)
            return
        try:
            os.rename(staging, final)
        except OSError:
            published = os.path.isdir(final) and (marker is None or os.path.exists(os.path.join(final, marker)))
            if replace or not published:  # not a race lost to another publisher
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def table_to_bytes(table: pa.Table, **options) -> bytes:
    """A Parquet file's bytes (``options`` go to ``pq.write_table``; zstd by default): written
    whole with ``write_bytes_atomic``, the file appears atomically."""
    sink = io.BytesIO()
    pq.write_table(table, sink, **{"compression": "zstd", **options})
    return sink.getvalue()


def sha256_stream(fs: pafs.FileSystem, path: str, copy_to: str | None = None) -> tuple[str, int]:
    """(sha256 hex, size) of a file, optionally copying it to a local path on the way."""
    h = hashlib.sha256()
    size = 0
    out = open(copy_to, "wb") if copy_to else None
    try:
        with fs.open_input_stream(path) as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
                size += len(chunk)
                if out:
                    out.write(chunk)
    finally:
        if out:
            out.close()
    return h.hexdigest(), size
