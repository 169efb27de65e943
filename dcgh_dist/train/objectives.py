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

from dcgh_dist.config import Config
from dcgh_dist.data.format import DatasetInfo

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
        self.weights = cfg.loss.bits_weights or (1.0,) * len(self.lengths)
        self.proxies = {k: ClassProxies(info.num_classes, k, cfg.loss.proxy_seed) for k in self.lengths}
        self.proxy_opts = {k: p.make_optimizer(cfg.loss) for k, p in self.proxies.items()}

    def build_model(self) -> nn.Module:
        return _hasher(self.cfg, self.info)

    def to(self, device) -> None:
        for p in self.proxies.values():
            p.to(device)

    def loss(self, codes, batch):
        from dcgh_dist.distributed import distributed_dcgh_loss

        primary = self.lengths[0]
        total, logged = None, {}
        for k, w in zip(self.lengths, self.weights):
            suffix = "" if k == primary else f"@{k}"
            loss, terms = distributed_dcgh_loss(codes[f"image_codes{suffix}"], codes[f"text_codes{suffix}"],
                                                batch["labels"], self.proxies[k](), self.cfg.loss)
            total = w * loss if total is None else total + w * loss
            if k == primary:
                logged.update(terms)
            if len(self.lengths) > 1:
                logged[f"total@{k}"] = terms["total"]
        if len(self.lengths) > 1:
            logged["total"] = sum(w * logged[f"total@{k}"] for k, w in zip(self.lengths, self.weights))
        return total, logged

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
        return {("proxy_optimizer" if k == self.lengths[0] else f"proxy_optimizer@{k}"): o.state_dict()
                for k, o in self.proxy_opts.items()}

    def load(self, extra_state, train_state):
        from dcgh_dist.losses import load_proxies_state

        load_proxies_state(self.proxies, self.lengths[0], extra_state)
        for k, opt in self.proxy_opts.items():
            name = "proxy_optimizer" if k == self.lengths[0] else f"proxy_optimizer@{k}"
            if name in train_state:
                opt.load_state_dict(train_state[name])


class DAPHProxyObjective(Objective):
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

        return distributed_daph_proxy_loss(codes["image_codes"], codes["text_codes"], codes["class_codes"],
                                           batch["labels"], self.cfg.daph)


class DAPHHashObjective(Objective):
    log_terms = ("image_net", "text_net")

    def __init__(self, cfg: Config, info: DatasetInfo, anchors: dict[str, Any]):
        self.cfg, self.info = cfg, info
        # +-1 codes and 0/1 labels: small integer types in the object store, float on the device
        self.anchors = {k: torch.as_tensor(anchors[k]).float()
                        for k in ("image_codes", "text_codes", "labels", "class_codes")}

    def build_model(self) -> nn.Module:
        return _hasher(self.cfg, self.info)

    def to(self, device) -> None:
        self.anchors = {k: v.to(device) for k, v in self.anchors.items()}

    def loss(self, codes, batch):
        from dcgh_dist.distributed import distributed_daph_hash_loss

        a = self.anchors
        total, logged = None, {"total": 0.0}
        for modality in ("image", "text"):
            loss, terms = distributed_daph_hash_loss(
                codes[f"{modality}_codes"], batch["labels"], a["image_codes"], a["text_codes"], a["labels"],
                a["class_codes"], self.cfg.daph, modality,  # the modality's positive rule
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
