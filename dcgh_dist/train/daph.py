"""DAPH's two stages on the one training path (``jobs/train.py --method daph --stage 1|2|all``).

Stage 1 trains the label-conditioned proxy nets and the class net (``objectives.DAPHProxyObjective``)
for ``daph.proxy_epochs`` epochs in ``<output>/stage1/``, then writes the **proxy codes**: for every
training row its image-aware and text-aware codes (sign of the nets' outputs, in eval mode unless
``daph.proxy_codes_train_mode``), its labels, and the class codes (the file: ``train/proxy_codes.py``).
With several code lengths (``model.bits`` as a list) stage 2 trains each head against its own length.

Stage 2 refuses proxy codes made from another dataset (or for other bit lengths or class count),
then trains the project's own label-free hasher against them (``objectives.DAPHHashObjective``):
its checkpoint is an ordinary one, so evaluation, encoding, indexes and the Serve app take it
unchanged. The codes are ``ray.put`` once and read zero-copy by every worker.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import numpy as np

from dcgh_dist.codes import length_key
from dcgh_dist.config import Config
from dcgh_dist.data.pipeline import collect, read_split
from dcgh_dist.metrics import mean_average_precision
from dcgh_dist.models.checkpoint import read_checkpoint_files, verified_state
from dcgh_dist.models.daph import build_daph_proxy_nets
from dcgh_dist.models.inputs import preprocessor_for
from dcgh_dist.storage import child_uri, resolve_filesystem, write_text_atomic
from dcgh_dist.train.proxy_codes import code_keys, proxy_codes_path, read_proxy_codes, signs, write_proxy_codes
from dcgh_dist.train.runner import plan_run, run_training

logger = logging.getLogger(__name__)

STAGE1_DIR = "stage1"


def stage1_config(cfg: Config) -> Config:
    """The stage-1 run: its own output directory and run name, a fixed epoch count, no val
    selection (its nets need labels, so val mAP would measure nothing)."""
    t = cfg.train
    return dataclasses.replace(cfg, train=dataclasses.replace(
        t, epochs=cfg.daph.proxy_epochs, select_on_val=False, patience=0,
        output_dir=child_uri(t.output_dir, STAGE1_DIR),
        run_name=f"{t.run_name}-stage1" if t.run_name else None,
    ), daph=dataclasses.replace(cfg.daph, stage="1"))


# -- stage 1: export and statistics -----------------------------------------------------------


class ProxyCodeBatches:
    """Ray Data actor: preprocessed training rows -> their stage-1 image and text codes."""

    def __init__(self, files: dict[str, bytes], train_mode: bool):
        import ray

        files = ray.get(files) if isinstance(files, ray.ObjectRef) else files
        self.model, _ = load_proxy_nets(files)
        self.model.train(train_mode)  # the reference writes its codes with dropout on

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()
                 if k in (self.model.image_key, self.model.text_key, "labels")}
            codes = self.model(t)  # every length's image and text codes (and the class codes)
        return {"id": batch["id"], "labels": batch["labels"],
                **{k: v.numpy() for k, v in codes.items() if not k.startswith("class_codes")}}


def load_proxy_nets(files: dict[str, bytes]):
    """(stage-1 nets, meta) from a stage-1 checkpoint's bytes, weights verified."""
    import torch

    state, meta, _ = verified_state(files)
    info = meta.dataset_info
    torch.manual_seed(0)
    nets = build_daph_proxy_nets(dataclasses.replace(meta.config.model, pretrained=None), info.num_classes,
                                 image_feature_dim=info.image_feature_dim, text_feature_dim=info.text_feature_dim,
                                 clip_architecture=meta.architecture or None)
    nets.load_state_dict(state)
    return nets.eval(), meta


def export_proxy_codes(uri: str, info, cfg: Config, checkpoint_dir: str, files) -> dict[str, np.ndarray]:
    """Codes of every training row (in id order) and the class codes, from the stage-1 checkpoint."""
    import ray
    import ray.data
    import torch

    ckpt = read_checkpoint_files(checkpoint_dir, cfg.data.s3_endpoint)
    ds = read_split(uri, cfg, ["train"], preprocessor_for(cfg, info), files=files).map_batches(
        ProxyCodeBatches, fn_constructor_args=(ray.put(ckpt), cfg.daph.proxy_codes_train_mode),
        batch_size=cfg.eval.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
        num_gpus=1 if cfg.train.use_gpu else 0,
    )
    out = collect(ds)
    order = np.argsort(out["id"], kind="stable")
    out = {k: v[order] for k, v in out.items()}
    nets, _ = load_proxy_nets(ckpt)
    nets.train(cfg.daph.proxy_codes_train_mode)
    primary = nets.lengths[0]
    with torch.no_grad():
        for k, c in nets.class_codes().items():
            out[length_key("class_codes", k, primary)] = c.numpy()
    return out


def length_codes(codes: dict[str, np.ndarray], bits: int, primary: int) -> dict[str, np.ndarray]:
    """One code length's image, text and class codes (with the labels) under the plain names."""
    return {"labels": codes["labels"],
            **{n: codes[length_key(n, bits, primary)] for n in ("image_codes", "text_codes", "class_codes")}}


def proxy_code_stats(codes: dict[str, np.ndarray], seed: int = 0, queries: int = 1000) -> dict[str, float]:
    """What DAPH.md §5 reports of the authors' NUS-WIDE 32-bit proxy codes, for comparison: bit
    balance, image/text agreement, Hamming distance to own and other class codes, and retrieval
    with the proxy codes themselves on the training set (``queries`` random queries, all rows)."""
    img, txt = signs(codes["image_codes"]).astype(np.float64), signs(codes["text_codes"]).astype(np.float64)
    cls = signs(codes["class_codes"]).astype(np.float64)
    labels = np.asarray(codes["labels"], dtype=np.float64)
    k = img.shape[1]
    own = labels.astype(bool)
    out: dict[str, float] = {"rows": float(len(img)), "bits": float(k)}
    for name, x in (("image", img), ("text", txt)):
        bit_means = np.abs(x.mean(0))
        dist = (k - x @ cls.T) / 2  # (N, C) Hamming distance to every class code
        out[f"{name}_bit_balance_mean"] = float(bit_means.mean())
        out[f"{name}_bit_balance_max"] = float(bit_means.max())
        out[f"{name}_to_own_class"] = float(dist[own].mean())
        out[f"{name}_to_other_classes"] = float(dist[~own].mean()) if (~own).any() else float("nan")
        single = own.sum(1) == 1
        if single.any():
            out[f"{name}_nearest_class_is_own"] = float((dist[single].argmin(1) == own[single].argmax(1)).mean())
        out[f"{name}_distinct_codes"] = float(len(np.unique(x, axis=0)))
    out["image_text_bit_agreement"] = float((img == txt).mean())
    q = np.random.default_rng(seed).choice(len(img), size=min(queries, len(img)), replace=False)
    out["proxy_map_i2t"] = mean_average_precision(img[q], txt, labels[q], labels)
    out["proxy_map_t2i"] = mean_average_precision(txt[q], img, labels[q], labels)
    pair = lambda a, b: (k - a @ b.T) / 2  # noqa: E731
    same = labels[q] @ labels.T
    identical = (same == labels[q].sum(1, keepdims=True)) & (same == labels.sum(1)[None])
    d = pair(img[q], img)
    out["image_identical_labels_distance"] = float(d[identical].mean())
    out["image_disjoint_labels_distance"] = float(d[same == 0].mean()) if (same == 0).any() else float("nan")
    return out


def run_stage1(cfg: Config, *, resume: bool = False) -> tuple[str, dict[str, float]]:
    """Train stage 1, write the proxy codes; returns (their path, their statistics)."""
    s1 = stage1_config(cfg)
    plan = plan_run(s1, resume=resume)
    logger.info("DAPH stage 1: proxy nets for %d epochs in %s", s1.train.epochs, plan.output_dir)
    outcome = run_training(s1, plan=plan, objective="daph-proxy")
    codes = export_proxy_codes(plan.uri, plan.scan.info, plan.cfg, outcome.checkpoint_dir, plan.scan.files)
    path = proxy_codes_path(cfg)
    write_proxy_codes(path, codes, plan.cfg, plan.scan.fingerprint)
    lengths = cfg.model.lengths
    stats = proxy_code_stats(codes, seed=cfg.train.seed)
    if len(lengths) > 1:  # every length's statistics, the primary's also at the top level
        stats["by_bits"] = {str(k): dict(stats) if k == lengths[0] else
                            proxy_code_stats(length_codes(codes, k, lengths[0]), seed=cfg.train.seed)
                            for k in lengths}
    write_text_atomic(*resolve_filesystem(child_uri(plan.output_dir, "proxy_code_stats.json"), cfg.data.s3_endpoint),
                      json.dumps(stats, indent=2))
    logger.info("DAPH stage 1: proxy codes of %d rows in %s; proxy-code mAP on train i2t %.3f t2i %.3f, "
                "bit balance %.3f / %.3f", len(codes["id"]), path, stats["proxy_map_i2t"], stats["proxy_map_t2i"],
                stats["image_bit_balance_mean"], stats["text_bit_balance_mean"])
    return path, stats


def stage2_anchors(cfg: Config, plan, codes: dict[str, Any] | None = None) -> Any:
    """The checked proxy codes (``codes``, if the caller has read them already) as one
    object-store entry for stage 2's workers."""
    import ray

    if codes is None:
        codes = read_proxy_codes(proxy_codes_path(cfg), cfg, plan.scan.fingerprint, plan.scan.info.num_classes)
    return ray.put({k: codes[k] for k in ("labels", *code_keys(cfg))})
