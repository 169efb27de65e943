"""Ray Data pipelines over the dataset format: read only the needed columns, filter a split,
preprocess in CPU tasks (separate from the training workers), stream.

Local paths and ``s3://`` prefixes go through the same code: a pyarrow filesystem resolved once
(with an optional S3-compatible endpoint) is handed to ``ray.data.read_parquet``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

from dcgh_dist.config import Config
from dcgh_dist.data.format import list_data_files
from dcgh_dist.storage import resolve_filesystem
from dcgh_dist.data.preprocess import BatchPreprocessor


FOOTER_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FILES_PER_FOOTER_ACTOR = 512


@contextlib.contextmanager
def footer_reader_actors(n_files: int) -> Iterator[int]:
    """Size Ray Data's Parquet footer-reader pool to the file count while a read is planned.

    Ray Data 2.60 starts ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` (default 32) actors every time a
    Parquet read is listed, i.e. at every epoch and every evaluation pass. Each actor is a fresh
    Python process: on a small node, 32 of them cost seconds of start-up per pass (measured on
    2 cores: 2.5 s per read of the 2-file demo with 32, 1.0 s with 2; 11 to 15 s per epoch while
    training workers hold the cores). Footer reads are I/O-bound and each actor already keeps 128
    in flight, so one actor per ``FILES_PER_FOOTER_ACTOR`` files (at most 32) loses nothing.
    The pool size is read when ``read_parquet`` builds its file indexer, in the calling process,
    so it is set around that call only. A value the user exported wins.
    """
    from dcgh_dist.ray_session import env_default

    with env_default(FOOTER_ENV, str(max(1, min(32, math.ceil(n_files / FILES_PER_FOOTER_ACTOR))))) as n:
        yield int(n)


def read_parquet(files: Sequence[str], **kwargs):
    """``ray.data.read_parquet`` of an explicit file list, with the footer-reader pool sized to it.

    Every Parquet read of the project (training, evaluation, encoding) goes through here, so none
    pays for 32 fresh footer-reader processes per pass; ``kwargs`` go to Ray unchanged.
    """
    import ray.data

    with footer_reader_actors(len(files)):
        return ray.data.read_parquet(list(files), **kwargs)


def read_split(
    uri: str,
    cfg: Config,
    splits: Sequence[str],
    pre: BatchPreprocessor,
    *,
    shuffle_files: bool = False,
    keep_split: bool = False,
    files: Sequence[str] | None = None,
):
    """A lazily executed, streaming Ray Dataset of the given splits' rows through ``pre`` (the
    model's preprocessing: :func:`dcgh_dist.models.inputs.preprocessor_for`).

    ``shuffle_files`` re-shuffles the file order on every epoch (each epoch re-executes the
    pipeline); rows are further mixed by the consumer's local shuffle buffer, so shuffling never
    needs the dataset in memory.
    """
    from ray.data.expressions import col

    fs, _ = resolve_filesystem(uri, cfg.data.s3_endpoint)
    files = list(files) if files is not None else list_data_files(uri, cfg.data.s3_endpoint)
    columns = ["id", "labels", "split"]
    if "image" in pre.modalities:
        columns.append(pre.info.image_column)
    if "text" in pre.modalities:
        columns.append(pre.info.text_column)
    ds = read_parquet(
        files,
        filesystem=fs,
        columns=columns,
        include_paths=True,  # so a bad row's error can name its file
        shuffle="files" if shuffle_files else None,
    )
    ds = ds.filter(expr=col("split").is_in(list(splits)))
    ds = ds.map_batches(
        _WithSplit(pre) if keep_split else pre,
        batch_format="numpy",
        batch_size=min(256, cfg.data.batch_size * 2),
    )
    return ds


def collect(ds, batch_size: int = 4096) -> dict:
    """Every row of a (small) Ray Dataset as one numpy array per column, in id order.

    Ray Data yields blocks in the order its read and map tasks finish, which changes from run to
    run; sorted by id, the same command gets the same arrays, so that a seeded permutation of them
    (each epoch's batches) and ties in a ranking over them (val mAP) are the same every time."""
    import numpy as np

    parts: dict[str, list] = {}
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(np.asarray(v))
    out = {k: np.concatenate(v) for k, v in parts.items()}
    if "id" in out:
        order = np.argsort(out["id"], kind="stable")
        out = {k: v[order] for k, v in out.items()}
    return out


class _WithSplit:
    """Preprocess and carry the ``split`` column through (evaluation needs it)."""

    def __init__(self, pre: BatchPreprocessor):
        self.pre = pre

    def __call__(self, batch):
        out = self.pre(batch)
        out["split"] = batch["split"]
        return out
