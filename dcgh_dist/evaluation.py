"""Retrieval evaluation: encode the query split and the retrieval database, score four tasks.

Tasks: image->text (i2t), text->image (t2i), image->image (i2i), text->text (t2t). The database is
every row whose split is not ``query``. Codes are binarised (code >= 0 -> 1) before ranking.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from dcgh_dist.config import Config
from dcgh_dist.data.format import DatasetInfo
from dcgh_dist.metrics import TASKS

logger = logging.getLogger(__name__)

_PASSTHROUGH = ("id", "labels", "split")  # the columns every model's codes share


def encode_splits(
    uri: str, info: DatasetInfo, cfg: Config, checkpoints: Mapping[str, str | None],
    files: Sequence[str] | None = None, bits: int | Sequence[int] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """``{name: relaxed codes, labels and splits of every query/db row}`` for each model in
    ``checkpoints`` (``{name: checkpoint directory, or None for the untrained model of cfg}``),
    through one Ray Data pipeline: the rows are read and preprocessed once and every model's
    towers run on each batch in one actor (decoding the images is the larger half of an
    evaluation, so a trained model and its untrained baseline share it). With a list of code
    lengths, each length's codes are ``<modality>_codes@K``, from one pass of the towers."""
    import ray
    import ray.data

    from dcgh_dist.data.pipeline import collect, read_split
    from dcgh_dist.encoding.actor import EncodeEach
    from dcgh_dist.models.checkpoint import read_checkpoint_files
    from dcgh_dist.models.inputs import preprocessor_for

    sources = {name: ({"checkpoint": ray.put(read_checkpoint_files(ckpt, cfg.data.s3_endpoint))}
                      if ckpt is not None else {"config": cfg.to_dict(), "dataset_info": info.to_json()})
               for name, ckpt in checkpoints.items()}
    ds = read_split(uri, cfg, ["query", "train", "val", "db"], preprocessor_for(cfg, info), keep_split=True,
                    files=files)
    ds = ds.map_batches(
        EncodeEach,
        fn_constructor_args=(sources, bits, _PASSTHROUGH),
        batch_size=cfg.eval.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),  # the models are loaded once, in the actor
        num_gpus=1 if cfg.train.use_gpu else 0,
    )
    rows = collect(ds)  # in id order: the database order ties in the ranking follow
    common = {k: rows[k] for k in _PASSTHROUGH}
    return {name: {**common, **{k[len(name) + 1:]: v for k, v in rows.items() if k.startswith(f"{name}/")}}
            for name in checkpoints}


def score(codes: dict[str, np.ndarray], cfg: Config) -> tuple[dict[str, Any], dict[str, dict]]:
    """Metrics for the four tasks and their Hamming-radius PR curves."""
    from dcgh_dist.metrics import pr_curve_hamming, retrieval_metrics

    is_query = codes["split"] == "query"
    if not is_query.any() or is_query.all():
        raise ValueError("evaluation needs rows in the 'query' split and in the retrieval database")
    q_lab, db_lab = codes["labels"][is_query], codes["labels"][~is_query]
    metrics: dict[str, Any] = {"num_query": int(is_query.sum()), "num_database": int((~is_query).sum())}
    curves: dict[str, dict] = {}
    for task, (q_mod, db_mod) in TASKS.items():
        qk, dk = f"{q_mod}_codes", f"{db_mod}_codes"
        m = retrieval_metrics(
            codes[qk][is_query], codes[dk][~is_query], q_lab, db_lab,
            map_topk=cfg.eval.map_topk, ndcg_k=cfg.eval.ndcg_k, precision_k=cfg.eval.precision_k,
        )
        for name, value in m.items():
            metrics[f"{name}_{task}"] = float(value)
        if task in ("i2t", "t2i"):
            curves[task] = pr_curve_hamming(codes[qk][is_query], codes[dk][~is_query], q_lab, db_lab)
    return metrics, curves


def evaluate(
    uri: str, info: DatasetInfo, cfg: Config, checkpoints: Mapping[str, str | None],
    files: Sequence[str] | None = None, lengths: Sequence[int] | None = None,
) -> dict[str, dict[int, tuple[dict[str, Any], dict[str, dict]]]]:
    """``{name: {bits: (metrics, PR curves)}}`` of each model in ``checkpoints`` (``{name:
    checkpoint directory, or None for the untrained model of cfg}``) at each of its code
    ``lengths`` (None: every length of ``cfg``), the data read and each model's towers run once
    for all of them."""
    lengths = tuple(lengths or cfg.model.lengths)
    out = {}
    for name, codes in encode_splits(uri, info, cfg, checkpoints, files, lengths).items():
        common = {k: codes[k] for k in ("labels", "split")}
        out[name] = {k: score({**common, "image_codes": codes[f"image_codes@{k}"],
                               "text_codes": codes[f"text_codes@{k}"]}, cfg) for k in lengths}
    return out


def write_pr_plot(curves: dict[str, dict], baselines: dict[str, dict[str, dict] | None], path: str,
                  title: str) -> None:
    """The trained model's curves beside each baseline's (``{"untrained": curves, "linear": ...}``)."""
    from dcgh_dist.metrics import plot_pr_curves

    all_curves = dict(curves)
    for name, base in baselines.items():
        for k, v in (base or {}).items():
            all_curves[f"{k} ({name})"] = v
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    plot_pr_curves(all_curves, path, title=title)
