"""The rows a report re-encodes, and their codes, in this process (no Ray).

The query split is read whole; the retrieval database (every other split, as in
``dcgh_dist.evaluation``) is capped at ``max_items`` rows chosen by a hash of the id
(``curves.sample_ids``), so the same cap gives the same rows on every run and for every model.
Both are in id order, the database order ``dcgh_dist.metrics`` ranks ties by.

Two passes over the Parquet files: the light columns (id, split, labels) decide the rows; the
payload columns (images and captions, or features) are then read file by file and encoded by
every model in turn, so no more than one file's payloads is held at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dcgh_dist.data.format import DatasetInfo, list_data_files
from dcgh_dist.data.labels import LabelTable
from dcgh_dist.report.curves import sample_ids
from dcgh_dist.storage import resolve_filesystem

logger = logging.getLogger(__name__)

PARTS = ("query", "db")
MODALITIES = ("image", "text")


@dataclass
class Rows:
    """The rows of the report's figures: ids and labels of the query split and the (capped)
    database."""

    ids: dict[str, np.ndarray]  # part -> int64 ids, sorted
    labels: dict[str, np.ndarray]  # part -> float32 multi-hot (n, C)
    first_label: dict[str, np.ndarray]  # part -> int64, the first label of each row's list
    db_total: int  # database rows before the cap
    files: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # part -> rows no model could encode

    @property
    def capped(self) -> bool:
        return self.db_total > len(self.ids["db"])

    def keep(self, part: str, mask: np.ndarray) -> None:
        self.dropped[part] = self.dropped.get(part, 0) + int((~mask).sum())
        for d in (self.ids, self.labels, self.first_label):
            d[part] = d[part][mask]


def choose_rows(uri: str, s3_endpoint: str | None, max_items: int | None) -> Rows:
    """Every query row and at most ``max_items`` database rows (light columns only)."""
    files = list_data_files(uri, s3_endpoint)
    table = LabelTable.read(uri, s3_endpoint, files=files)
    is_query = table.in_splits(("query",))
    chosen = {"query": table.ids[is_query], "db": sample_ids(table.ids[~is_query], max_items)}
    out_labels, first = {}, {}
    for part, part_ids in chosen.items():
        rows = table.positions(part_ids)
        out_labels[part] = table.multihot(rows, np.float32)
        first[part] = table.first[rows]
    return Rows(ids=chosen, labels=out_labels, first_label=first, db_total=int((~is_query).sum()), files=files)


def _preprocessor_key(pre) -> tuple:
    return (pre.image_size, pre.context_length, pre.tokenizer_dir, pre.info.image_column, pre.info.text_column)


def encode_rows(uri: str, info: DatasetInfo, s3_endpoint: str | None, rows: Rows, encoders: Mapping[str, object],
                batch_size: int = 256) -> tuple[dict[str, dict[str, dict[str, np.ndarray]]], dict[str, np.ndarray]]:
    """``({model name: {part: {"image": relaxed codes, "text": relaxed codes}}}, {part: ok})`` of
    ``rows``, for every ``dcgh_dist.models.encoder.Encoder`` in ``encoders``.

    ``ok[part][i]`` is False where row i's image or caption could not be used (the
    preprocessor's skip mode names it): its codes are zeros, to be dropped with
    ``Rows.keep`` (see :func:`drop_unusable`).
    """
    fs, _ = resolve_filesystem(uri, s3_endpoint)
    columns = ["id", info.image_column, info.text_column]
    wanted = pa.array(np.concatenate([rows.ids[p] for p in PARTS]), pa.int64())
    # One preprocessing per batch for every model that preprocesses alike (images decoded once).
    pres: dict[tuple, object] = {}
    enc_pre = {}
    for name, enc in encoders.items():
        pre = enc.preprocessor(MODALITIES, on_error="skip", with_labels=False)
        enc_pre[name] = pres.setdefault(_preprocessor_key(pre), pre)
    out = {name: {p: {m: np.zeros((len(rows.ids[p]), enc.bits), dtype=np.float32) for m in MODALITIES}
                  for p in PARTS} for name, enc in encoders.items()}
    seen = {p: np.zeros(len(rows.ids[p]), dtype=bool) for p in PARTS}
    ok = {p: np.ones(len(rows.ids[p]), dtype=bool) for p in PARTS}
    for path in rows.files:
        table = pq.read_table(path, columns=columns, filesystem=fs)
        table = table.filter(pc.is_in(table.column("id"), value_set=wanted))
        for start in range(0, table.num_rows, batch_size):
            chunk = table.slice(start, batch_size)
            batch = {c: chunk.column(c).to_numpy(zero_copy_only=False) for c in columns}
            ids = np.asarray(batch["id"], dtype=np.int64)
            batch["id"] = ids
            batch["path"] = np.array([path] * len(ids), dtype=object)
            where = {}
            for p in PARTS:
                pos = np.minimum(np.searchsorted(rows.ids[p], ids), max(len(rows.ids[p]) - 1, 0))
                hit = (rows.ids[p][pos] == ids) if len(rows.ids[p]) else np.zeros(len(ids), dtype=bool)
                where[p] = (pos, hit)
                seen[p][pos[hit]] = True
            done: dict[int, dict] = {}
            for name, enc in encoders.items():
                pre = enc_pre[name]
                if id(pre) not in done:
                    done[id(pre)] = pre(batch)
                    good = np.ones(len(ids), dtype=bool)
                    for m in MODALITIES:
                        good &= np.array([e == "" for e in done[id(pre)][f"{m}_error"]], dtype=bool)
                    for p, (pos, hit) in where.items():
                        ok[p][pos[hit & ~good]] = False
                x = done[id(pre)]
                codes = {m: enc.relaxed(m, x[enc.key(m)]) for m in MODALITIES}
                for p, (pos, hit) in where.items():
                    for m in MODALITIES:
                        out[name][p][m][pos[hit]] = codes[m][hit]
    for p in PARTS:
        if not seen[p].all():
            raise ValueError(f"{uri}: {int((~seen[p]).sum())} {p} rows were not found on the second read: "
                             "the dataset changed while the report read it")
    return out, ok


def drop_unusable(rows: Rows, ok: Mapping[str, np.ndarray], codes: Sequence[dict]) -> None:
    """Drop the rows that are not ``ok`` from ``rows`` and from every codes dict (in place)."""
    for p in PARTS:
        if not ok[p].all():
            logger.warning("%d %s rows could not be encoded (bad image or caption): left out of the figures",
                           int((~ok[p]).sum()), p)
        for c in codes:
            for m in MODALITIES:
                c[p][m] = c[p][m][ok[p]]
        rows.keep(p, ok[p])


def linear_codes(uri: str, info: DatasetInfo, s3_endpoint: str | None, rows: Rows, bits: int, seed: int,
                 ridge_rel: float) -> dict[str, dict[str, np.ndarray]]:
    """The linear hashing baseline's codes of ``rows`` (``dcgh_dist.baselines``), refitted on the
    train split with the ridge strength the run chose (metrics.json ``linear.ridge_rel``)."""
    from dcgh_dist.baselines import linear_hashing, read_feature_rows

    feats = read_feature_rows(uri, info, s3_endpoint, rows.files)
    codes = linear_hashing(feats, bits, seed, ridge_rel)
    out = {}
    for p in PARTS:
        pos = np.searchsorted(feats["id"], rows.ids[p])
        out[p] = {m: codes[f"{m}_codes"][pos] for m in MODALITIES}  # float64: the signs as scored
    return out
