"""What each training method adds to the one training loop: its model, its loss, and any state
beside the engine's weights (DCGH's class proxies and their SGD).

The loop (``train/loop.py``) owns everything else: data, engine, accumulation, checkpoints,
validation, early stopping, restarts. So DCGH and both DAPH stages get the same Ray Train /
DeepSpeed / Ray Data path, the same checkpoints and the same ``--resume``.

* ``dcgh``: the hasher and the DCGH loss over codes gathered from all workers, with learnable
  class proxies optimised by their own SGD (as in the authors' code).
* ``daph-proxy`` (DAPH stage 1): the label-conditioned proxy nets and the class net
  (``models/daph.py``), trained with ``daph_proxy_loss``; labels are an input of the model.
* ``daph-hash`` (DAPH stage 2): the project's label-free hasher, trained against the frozen
  stage-1 codes (the anchors, replicated on every worker) with ``daph_hash_loss``: the image
  codes of a batch under ``daph.positive_rule_image``, its text codes under
  ``positive_rule_text``. The reference alternates an image pass and a text pass per epoch; the
  two hash nets share no parameter, so one step on the sum of both terms trains each on every
  batch (per-step interleaving, which DAPH.md §7 allows), and the model is the very hasher DCGH
  trains: encode, index and serve take it unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dcgh_dist.codes import length_key, length_suffix
from dcgh_dist.config import Config
from dcgh_dist.data.format import DatasetInfo
from dcgh_dist.train.proxy_codes import code_keys

METHOD_OBJECTIVES = ("dcgh", "daph-proxy", "daph-hash")


class Objective:
    """Interface. ``extra_state`` is saved as the checkpoint's ``proxies.pt``."""

    log_terms: tuple[str, ...] = ()

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def to(self, device) -> None:
        pass

    def loss(self, codes: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self, grad_scale: float) -> None:
        """Called after every optimizer step of the engine."""

    def extra_state(self) -> dict[str, Tensor]:
        return {}

    def extra_train_state(self) -> dict[str, Any]:
        return {}

    def load(self, extra_state: dict[str, Tensor], train_state: dict[str, Any]) -> None:
        pass


def _hasher(cfg: Config, info: DatasetInfo) -> nn.Module:
    from dcgh_dist.models import build_model

    return build_model(cfg.model, image_feature_dim=info.image_feature_dim, text_feature_dim=info.text_feature_dim)


class DCGHObjective(Objective):
    """DCGH; with several code lengths (``model.extra_bits``) one set of class proxies per length
    and the loss summed over lengths with ``loss.bits_weights``, on one pass of the towers."""

    log_terms = ("proxy", "pairwise_pos", "pairwise_neg", "variance")

    def __init__(self, cfg: Config, info: DatasetInfo):
        from dcgh_dist.losses import ClassProxies

        self.cfg, self.info = cfg, info
        self.lengths = cfg.model.lengths
        self.proxies = {k: ClassProxies(info.num_classes, k, cfg.loss.proxy_seed) for k in self.lengths}
        self.proxy_opts = {k: p.make_optimizer(cfg.loss) for k, p in self.proxies.items()}

    def build_model(self) -> nn.Module:
        return _hasher(self.cfg, self.info)

    def to(self, device) -> None:
        for p in self.proxies.values():
            p.to(device)

    def loss(self, codes, batch):
        from dcgh_dist.distributed import distributed_dcgh_loss

        return _sum_over_lengths(self.cfg, lambda k, s: distributed_dcgh_loss(
            codes[f"image_codes{s}"], codes[f"text_codes{s}"], batch["labels"], self.proxies[k](), self.cfg.loss))

    def after_step(self, grad_scale: float) -> None:
        from dcgh_dist.distributed import all_reduce_grads

        for k, proxies in self.proxies.items():
            if grad_scale != 1.0:  # fp16 loss scaling reached the proxies too
                for p in proxies.parameters():
                    if p.grad is not None:
                        p.grad.div_(grad_scale)
            all_reduce_grads(proxies.parameters())
            self.proxy_opts[k].step()
            self.proxy_opts[k].zero_grad(set_to_none=True)

    def extra_state(self):
        from dcgh_dist.losses import proxies_state

        return proxies_state(self.proxies, self.lengths[0])

    def extra_train_state(self):
        return {length_key("proxy_optimizer", k, self.lengths[0]): o.state_dict()
                for k, o in self.proxy_opts.items()}

    def load(self, extra_state, train_state):
        from dcgh_dist.losses import load_proxies_state

        load_proxies_state(self.proxies, self.lengths[0], extra_state)
        for k, opt in self.proxy_opts.items():
            name = length_key("proxy_optimizer", k, self.lengths[0])
            if name in train_state:
                opt.load_state_dict(train_state[name])


def _sum_over_lengths(cfg: Config, per_length) -> tuple[Tensor, dict[str, float]]:
    """``sum_k w_k * loss_k`` over ``model.lengths`` with ``loss.bits_weights``; ``per_length(k,
    suffix)`` gives one length's (loss, logged terms), ``suffix`` being the length's key suffix in
    the model's outputs (``@K``; none for the primary length). Logs the primary length's terms under
    their own names and, with several lengths, ``total@K`` per length and the weighted total."""
    lengths = cfg.model.lengths
    weights = cfg.loss.bits_weights or (1.0,) * len(lengths)
    total, logged = None, {}
    for k, w in zip(lengths, weights):
        loss, terms = per_length(k, length_suffix(k, lengths[0]))
        total = w * loss if total is None else total + w * loss
        if k == lengths[0]:
            logged.update(terms)
        if len(lengths) > 1:
            logged[f"total@{k}"] = terms["total"]
    if len(lengths) > 1:
        logged["total"] = sum(w * logged[f"total@{k}"] for k, w in zip(lengths, weights))
    return total, logged


class DAPHProxyObjective(Objective):
    """DAPH stage 1; with several code lengths a code layer and a class net per length on one
    pass of the backbones, the loss summed over lengths as DCGH's is."""

    log_terms = ("proxy_img", "proxy_txt", "orth", "balance", "quant")

    def __init__(self, cfg: Config, info: DatasetInfo):
        self.cfg, self.info = cfg, info

    def build_model(self) -> nn.Module:
        from dcgh_dist.models.daph import build_daph_proxy_nets

        return build_daph_proxy_nets(
            self.cfg.model, self.info.num_classes, image_feature_dim=self.info.image_feature_dim,
            text_feature_dim=self.info.text_feature_dim,
            freeze_reference_layers=self.cfg.daph.freeze_reference_layers,
        )

    def loss(self, codes, batch):
        from dcgh_dist.distributed import distributed_daph_proxy_loss

        return _sum_over_lengths(self.cfg, lambda k, s: distributed_daph_proxy_loss(
            codes[f"image_codes{s}"], codes[f"text_codes{s}"], codes[f"class_codes{s}"], batch["labels"],
            self.cfg.daph))


class DAPHHashObjective(Objective):
    """DAPH stage 2; with several code lengths each head trains against its own length's
    stage-1 codes (``anchors`` keys with the same ``@K`` suffixes), summed over lengths."""

    log_terms = ("image_net", "text_net")

    def __init__(self, cfg: Config, info: DatasetInfo, anchors: dict[str, Any]):
        self.cfg, self.info = cfg, info
        # +-1 codes and 0/1 labels: small integer types in the object store, float on the device;
        # the labels are one array whatever the lengths
        self.anchors = {k: torch.as_tensor(anchors[k]).float() for k in ("labels", *code_keys(cfg))}

    def build_model(self) -> nn.Module:
        return _hasher(self.cfg, self.info)

    def to(self, device) -> None:
        self.anchors = {k: v.to(device) for k, v in self.anchors.items()}

    def loss(self, codes, batch):
        return _sum_over_lengths(self.cfg, lambda k, s: self._one_length(codes, batch, s))

    def _one_length(self, codes, batch, s: str):
        from dcgh_dist.distributed import distributed_daph_hash_loss

        a = self.anchors
        total, logged = None, {"total": 0.0}
        for modality in ("image", "text"):
            loss, terms = distributed_daph_hash_loss(
                codes[f"{modality}_codes{s}"], batch["labels"], a[f"image_codes{s}"], a[f"text_codes{s}"],
                a["labels"], a[f"class_codes{s}"], self.cfg.daph, modality,  # the modality's positive rule
            )
            total = loss if total is None else total + loss
            logged[f"{modality}_net"] = terms["total"]
            logged["total"] += terms["total"]
        return total, logged


def build_objective(name: str, cfg: Config, info: DatasetInfo, anchors: dict[str, Any] | None = None) -> Objective:
    if name == "dcgh":
        return DCGHObjective(cfg, info)
    if name == "daph-proxy":
        return DAPHProxyObjective(cfg, info)
    if name == "daph-hash":
        if anchors is None:
            raise ValueError("DAPH stage 2 needs the stage-1 proxy codes (anchors)")
        return DAPHHashObjective(cfg, info, anchors)
    raise ValueError(f"unknown training objective {name!r}; known: {list(METHOD_OBJECTIVES)}")
