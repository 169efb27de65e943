"""DAPH stage-1 networks: label-conditioned proxy encoders and the class net (no Ray).

The reference (``tests/data/golden/DAPH.md`` §1.1) puts AlexNet (images) or a bag-of-words MLP
(texts) under the label-conditioned heads; here the backbone is any of the project's towers
(CLIP or feature MLPs, built by ``build_model``), so DAPH trains on every dataset DCGH does.
Stage 2 needs no new model: its label-free hashing nets are the project's ``CrossModalHasher``
(tower -> Linear -> tanh).

What is not reproduced: the reference's backbone-specific initialisations (AlexNet weights,
N(0, 0.3^2) on the text branch's 4096->512 layer), since the backbone is the project's own.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcgh_dist.codes import length_key
from dcgh_dist.config import ModelConfig

__all__ = ["ClassNet", "DAPHProxyNets", "LabelProxyEncoder", "build_daph_proxy_nets"]


class LabelProxyEncoder(nn.Module):
    """Backbone features + labels -> unit K-dim proxy code (the reference's ``Label_Net``).

    ``normalize(code(normalize(proj(backbone(x))) + normalize(label_mlp(y))))``, with
    ``proj`` = Linear(D, 512) and ``label_mlp`` = Linear(C, 512) -> ReLU -> Dropout -> Linear(512,
    512). No tanh: the loss works on unit vectors.

    ``freeze_reference_layers``: the reference leaves ``proj`` (its ``cl3``), the label MLP and the
    code layer of the *image* proxy net out of the optimiser, so they keep their random
    initialisation (DAPH.md §4.4). Setting it freezes the same three layers (the backbone still
    trains, through them); the text proxy net trains fully in the reference.

    ``extra_bits``: further code lengths, each with its own code layer on the same fused
    feature (one backbone pass for every length, as ``CrossModalHasher`` does); ``codes()``
    returns every length's code, ``forward()`` the primary one's.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        bits: int,
        *,
        feature_dim: int | None = None,
        hidden: int = 512,
        label_dropout: float = 0.1,
        freeze_reference_layers: bool = False,
        extra_bits: tuple[int, ...] = (),
    ):
        super().__init__()
        dim = feature_dim if feature_dim is not None else getattr(backbone, "out_dim", None)
        if not dim:
            raise ValueError("the backbone has no out_dim attribute: pass feature_dim")
        self.backbone = backbone
        self.proj = nn.Linear(dim, hidden)
        self.label_mlp = nn.Sequential(
            nn.Linear(num_classes, hidden), nn.ReLU(), nn.Dropout(label_dropout), nn.Linear(hidden, hidden)
        )
        self.code = nn.Linear(hidden, bits)
        self.extra_bits = tuple(extra_bits)
        if self.extra_bits:  # absent for one length: a one-length checkpoint keeps its names
            self.extra_codes = nn.ModuleDict({str(k): nn.Linear(hidden, k) for k in self.extra_bits})
        self.num_classes = num_classes
        self.bits = bits
        if freeze_reference_layers:
            self.freeze_reference_layers_()

    def freeze_reference_layers_(self) -> None:
        layers = [self.proj, self.label_mlp, self.code]
        if self.extra_bits:  # the extra lengths' code layers stand where the reference's one does
            layers.append(self.extra_codes)
        for module in layers:
            for p in module.parameters():
                p.requires_grad_(False)

    def codes(self, inputs: Tensor, labels: Tensor) -> dict[int, Tensor]:
        """{bits: (B, bits) unit codes} for every length, the primary first."""
        feat = F.normalize(self.proj(self.backbone(inputs)), p=2, dim=1)
        fused = feat + F.normalize(self.label_mlp(labels.to(feat.dtype)), p=2, dim=1)
        out = {self.bits: F.normalize(self.code(fused), p=2, dim=1)}
        for k in self.extra_bits:
            out[k] = F.normalize(self.extra_codes[str(k)](fused), p=2, dim=1)
        return out

    def forward(self, inputs: Tensor, labels: Tensor) -> Tensor:
        return self.codes(inputs, labels)[self.bits]


class ClassNet(nn.Module):
    """One unit K-dim code per class (the reference's ``LabelNet`` applied to the identity).

    Linear(C, hidden) -> ReLU -> Dropout(0.2) -> Linear(hidden, K) -> normalize; both weight
    matrices drawn from N(0, init_std^2) (0.2 in the reference), biases at PyTorch's default.
    ``forward()`` takes no input: the input is always I_C, one row per class.
    """

    def __init__(self, num_classes: int, bits: int, *, hidden: int = 4096, dropout: float = 0.2,
                 init_std: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_classes, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, bits)
        )
        for layer in (self.net[0], self.net[3]):
            nn.init.normal_(layer.weight, mean=0.0, std=init_std)
        self.num_classes = num_classes
        self.bits = bits

    def forward(self) -> Tensor:
        w = self.net[0].weight
        eye = torch.eye(self.num_classes, dtype=w.dtype, device=w.device)
        return F.normalize(self.net(eye), p=2, dim=1)


class DAPHProxyNets(nn.Module):
    """The three stage-1 nets in one module (one DDP wrapper, one checkpoint).

    ``forward(batch)`` reads the image and text inputs (``image_key``/``text_key``, as the project's
    hasher) and ``labels``, and returns ``{"image_codes", "text_codes", "class_codes"}``: the
    inputs of ``daph_proxy_loss``. With several code lengths (the encoders' ``extra_bits``) each
    extra length ``K`` has its own class net (``extra_classes``) and adds ``image_codes@K``,
    ``text_codes@K`` and ``class_codes@K``, the names ``CrossModalHasher`` gives its extra heads.
    """

    def __init__(self, image: LabelProxyEncoder, text: LabelProxyEncoder, classes: ClassNet,
                 image_key: str = "image", text_key: str = "text", label_key: str = "labels",
                 extra_classes: dict[int, ClassNet] | None = None):
        super().__init__()
        self.image = image
        self.text = text
        self.classes = classes
        extra_classes = extra_classes or {}
        if not (image.extra_bits == text.extra_bits == tuple(extra_classes)):
            raise ValueError(f"the image ({image.extra_bits}), text ({text.extra_bits}) and class "
                             f"({tuple(extra_classes)}) nets must have the same extra code lengths")
        if extra_classes:
            self.extra_classes = nn.ModuleDict({str(k): v for k, v in extra_classes.items()})
        self.image_key, self.text_key, self.label_key = image_key, text_key, label_key

    @property
    def lengths(self) -> tuple[int, ...]:
        return (self.image.bits, *self.image.extra_bits)

    def class_codes(self) -> dict[int, Tensor]:
        """{bits: (C, bits) unit class codes} for every length, the primary first."""
        out = {self.image.bits: self.classes()}
        for k in self.image.extra_bits:
            out[k] = self.extra_classes[str(k)]()
        return out

    # The training engine's two parameter groups, as for CrossModalHasher: the towers (small lr
    # when pretrained CLIP) and everything DAPH adds on top of them (head lr).
    @property
    def image_tower(self) -> nn.Module:
        return self.image.backbone

    @property
    def text_tower(self) -> nn.Module:
        return self.text.backbone

    def tower_parameters(self):
        return [p for m in (self.image_tower, self.text_tower) for p in m.parameters() if p.requires_grad]

    def head_parameters(self):
        towers = {id(p) for m in (self.image_tower, self.text_tower) for p in m.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in towers]

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        labels = batch[self.label_key]
        primary = self.image.bits
        parts = {"image_codes": self.image.codes(batch[self.image_key], labels),
                 "text_codes": self.text.codes(batch[self.text_key], labels),
                 "class_codes": self.class_codes()}
        return {length_key(name, k, primary): v
                for name, by_len in parts.items() for k, v in by_len.items()}


def build_daph_proxy_nets(
    cfg: ModelConfig,
    num_classes: int,
    *,
    image_feature_dim: int | None = None,
    text_feature_dim: int | None = None,
    clip_architecture: dict | None = None,
    freeze_reference_layers: bool = False,
    class_hidden: int = 4096,
) -> DAPHProxyNets:
    """Stage-1 nets over the towers ``build_model`` makes for ``cfg`` (its hash heads unused).

    ``freeze_reference_layers`` applies to the image proxy net only, as in the reference.
    ``cfg.extra_bits`` gives every net a code layer (and a class net) per extra length.
    """
    from dcgh_dist.models import build_model

    hasher = build_model(cfg, image_feature_dim=image_feature_dim, text_feature_dim=text_feature_dim,
                         clip_architecture=clip_architecture)
    extra = tuple(cfg.extra_bits)
    return DAPHProxyNets(
        LabelProxyEncoder(hasher.image_tower, num_classes, cfg.bits, extra_bits=extra,
                          freeze_reference_layers=freeze_reference_layers),
        LabelProxyEncoder(hasher.text_tower, num_classes, cfg.bits, extra_bits=extra),
        ClassNet(num_classes, cfg.bits, hidden=class_hidden),
        image_key=hasher.image_key,
        text_key=hasher.text_key,
        extra_classes={k: ClassNet(num_classes, k, hidden=class_hidden) for k in extra},
    )
