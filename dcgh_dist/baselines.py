"""A classical baseline scored beside every trained model of a feature dataset.

**Linear hashing** (in the spirit of the supervised linear methods of 2010-2012): ridge regression
of each modality's training features onto the training labels, one seeded random rotation of the
label space into K dimensions shared by both modalities, and the sign. It needs no training run
and takes seconds, so a run can say how far it is above a method from 2010 on the very same
splits. The ridge strength is chosen on the val split (val-vs-val mAP, as model selection of the
trained model), from a grid relative to the features' scale, so the baseline is not a straw man.

Only feature datasets (``image_features``/``text_features``) have one: on raw images and captions
a linear map has no features to start from.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from dcgh_dist.config import Config
from dcgh_dist.data.format import DatasetInfo

logger = logging.getLogger(__name__)

# lambda = rel * trace(X^T X) / d: from nearly unregularised to strongly shrunk
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def has_linear_baseline(info: DatasetInfo) -> bool:
    return info.image_column == "image_features" and info.text_column == "text_features"


def read_feature_rows(uri: str, info: DatasetInfo, s3_endpoint: str | None,
                      files: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """id, multi-hot labels, split and both feature matrices of every row, in id order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dcgh_dist.data.format import SPLITS, list_data_files
    from dcgh_dist.data.labels import LabelTable
    from dcgh_dist.storage import resolve_filesystem

    fs, _ = resolve_filesystem(uri, s3_endpoint)
    cols = ["id", "labels", "split", "image_features", "text_features"]
    table = pa.concat_tables(
        pq.read_table(f, columns=cols, filesystem=fs)
        for f in (files if files is not None else list_data_files(uri, s3_endpoint))
    )
    table = table.sort_by("id")  # the database order evaluation uses
    labels = LabelTable.from_table(table, info.num_classes, uri, sort=False)

    def matrix(name: str) -> np.ndarray:
        col = table.column(name).combine_chunks()
        return np.asarray(col.flatten(), dtype=np.float64).reshape(table.num_rows, -1)

    everything = np.arange(len(labels))
    return {"id": labels.ids, "labels": labels.multihot(everything, np.float64),
            "split": np.asarray(SPLITS, dtype=object)[labels.split],
            "image_features": matrix("image_features"), "text_features": matrix("text_features")}


def fit_ridge(x: np.ndarray, y: np.ndarray, rel: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean, W) of the ridge regression of centred ``y`` on centred ``x``:
    W = (Xc^T Xc + lambda I)^-1 Xc^T Yc with lambda = rel * trace(Xc^T Xc) / d."""
    mu = x.mean(0)
    xc = x - mu
    gram = xc.T @ xc
    lam = rel * np.trace(gram) / x.shape[1]
    w = np.linalg.solve(gram + lam * np.eye(x.shape[1]), xc.T @ (y - y.mean(0)))
    return mu, w


def random_rotation(num_classes: int, bits: int, seed: int) -> np.ndarray:
    """A (C, K) matrix with orthonormal rows (C <= K) or columns (C > K), seeded."""
    g = np.random.default_rng(seed).standard_normal((max(num_classes, bits), min(num_classes, bits)))
    q, _ = np.linalg.qr(g)
    return q.T if num_classes <= bits else q


def ridge_projections(rows: dict[str, np.ndarray], rel: float) -> dict[str, np.ndarray]:
    """Every row's features mapped into label space by the ridge fitted on the train split
    (per modality): the part of linear hashing that does not depend on the code length."""
    train = rows["split"] == "train"
    out = {}
    for m in ("image", "text"):
        x = rows[f"{m}_features"]
        mu, w = fit_ridge(x[train], rows["labels"][train], rel)
        out[m] = (x - mu) @ w
    return out


def linear_hashing(rows: dict[str, np.ndarray], bits: int, seed: int, rel: float,
                   projections: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Relaxed codes (sign is taken by the metrics) of every row, fitted on the train split;
    ``projections`` (``ridge_projections(rows, rel)``) when the caller has them already."""
    projections = projections if projections is not None else ridge_projections(rows, rel)
    rot = random_rotation(rows["labels"].shape[1], bits, seed)
    return {f"{m}_codes": z @ rot for m, z in projections.items()}


def linear_baseline(uri: str, info: DatasetInfo, cfg: Config, files: Sequence[str] | None = None,
                    bits: int | None = None) -> tuple[dict[str, Any], dict[str, dict]]:
    """Metrics and PR curves of linear hashing at ``bits`` (default ``model.bits``), scored
    exactly like the trained model."""
    return linear_baselines(uri, info, cfg, files, (bits or cfg.model.bits,))[bits or cfg.model.bits]


def linear_baselines(uri: str, info: DatasetInfo, cfg: Config, files: Sequence[str] | None = None,
                     lengths: Sequence[int] | None = None) -> dict[int, tuple[dict[str, Any], dict[str, dict]]]:
    """``linear_baseline`` at each code length (default ``model.lengths``), reading the features
    and fitting each ridge strength once for all of them."""
    from dcgh_dist.evaluation import score
    from dcgh_dist.metrics import validation_metrics

    rows = read_feature_rows(uri, info, cfg.data.s3_endpoint, files)
    if not (rows["split"] == "train").any():
        raise ValueError(f"{uri}: the linear baseline needs rows in the 'train' split")
    val = rows["split"] == "val"
    grid = RIDGE_GRID if val.sum() > 1 else (RIDGE_GRID[2],)
    projections = {r: ridge_projections(rows, r) for r in grid}
    out = {}
    for bits in lengths or cfg.model.lengths:
        rel, chosen_on = RIDGE_GRID[2], "default"
        if val.sum() > 1:
            scores = {}
            for r in RIDGE_GRID:
                codes = linear_hashing(rows, bits, cfg.train.seed, r, projections[r])
                scores[r] = validation_metrics({"image_codes": codes["image_codes"][val],
                                                "text_codes": codes["text_codes"][val],
                                                "labels": rows["labels"][val]})["val_map"]
            rel, chosen_on = max(scores, key=lambda r: (scores[r], -r)), "val"
        codes = linear_hashing(rows, bits, cfg.train.seed, rel, projections[rel])
        metrics, curves = score({**codes, "labels": rows["labels"], "split": rows["split"]}, cfg)
        metrics["ridge_rel"] = rel
        metrics["ridge_chosen_on"] = chosen_on
        logger.info("linear hashing baseline, %d bits: ridge %g (chosen on %s), mAP i2t %.4f t2i %.4f",
                    bits, rel, chosen_on, metrics["map_i2t"], metrics["map_t2i"])
        out[bits] = (metrics, curves)
    return out
