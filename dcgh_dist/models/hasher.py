"""The cross-modal hasher: an image tower and a text tower, each followed by a hash head."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from dcgh_dist.codes import length_key


class HashHead(nn.Module):
    """Linear -> Dropout -> tanh: relaxed K-bit codes in (-1, 1); the bit is ``code >= 0``.

    Same order as the authors' ``LinearHash`` (dropout on the pre-activation).
    """

    def __init__(self, in_dim: int, bits: int, dropout: float = 0.2):
        super().__init__()
        self.fc = nn.Linear(in_dim, bits)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dropout(self.fc(x)))


class CrossModalHasher(nn.Module):
    """Maps images and texts into one K-bit Hamming space.

    ``forward`` takes a batch mapping with ``image`` (or ``image_features``) and ``text`` (or
    ``text_features``) and returns ``{"image_codes", "text_codes"}``. Either modality may be
    missing: encoding jobs hash one side at a time.

    ``extra_bits``: further code lengths, each with its own pair of heads on the same towers (one
    forward pass of the towers for every length); ``forward`` then also returns
    ``image_codes@K`` / ``text_codes@K`` for each, and ``encode_*(x, bits=K)`` picks a length.
    The primary heads keep their names, so a one-length checkpoint is what it always was.
    """

    def __init__(
        self,
        image_tower: nn.Module,
        text_tower: nn.Module,
        bits: int,
        dropout: float = 0.2,
        image_key: str = "image",
        text_key: str = "text",
        extra_bits: Sequence[int] = (),
    ):
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_head = HashHead(image_tower.out_dim, bits, dropout)
        self.text_head = HashHead(text_tower.out_dim, bits, dropout)
        self.bits = bits
        self.extra_bits = tuple(extra_bits)
        if self.extra_bits:
            self.extra_image_heads = nn.ModuleDict(
                {str(k): HashHead(image_tower.out_dim, k, dropout) for k in self.extra_bits})
            self.extra_text_heads = nn.ModuleDict(
                {str(k): HashHead(text_tower.out_dim, k, dropout) for k in self.extra_bits})
        self.image_key = image_key
        self.text_key = text_key

    @property
    def lengths(self) -> tuple[int, ...]:
        return (self.bits, *self.extra_bits)

    def _head(self, modality: str, bits: int | None) -> nn.Module:
        if bits is None or bits == self.bits:
            return self.image_head if modality == "image" else self.text_head
        if bits not in self.extra_bits:
            raise ValueError(f"this model hashes to {list(self.lengths)} bits, not {bits}")
        return (self.extra_image_heads if modality == "image" else self.extra_text_heads)[str(bits)]

    def encode(self, modality: str, x: Tensor, lengths: Sequence[int] | None = None) -> dict[int, Tensor]:
        """``{bits: relaxed codes}`` of one modality at each of ``lengths`` (None: the primary
        length), from one pass of its tower: the heads are a small share of the cost."""
        feats = (self.image_tower if modality == "image" else self.text_tower)(x)
        return {k: self._head(modality, k)(feats) for k in (lengths or (self.bits,))}

    def encode_image(self, image: Tensor, bits: int | None = None) -> Tensor:
        return self.encode("image", image, (bits or self.bits,))[bits or self.bits]

    def encode_text(self, text: Tensor, bits: int | None = None) -> Tensor:
        return self.encode("text", text, (bits or self.bits,))[bits or self.bits]

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for modality, key in (("image", self.image_key), ("text", self.text_key)):
            if key not in batch:
                continue
            for k, codes in self.encode(modality, batch[key], self.lengths).items():
                out[length_key(f"{modality}_codes", k, self.bits)] = codes
        if not out:
            raise KeyError(f"batch has neither {self.image_key!r} nor {self.text_key!r}")
        return out

    def tower_parameters(self):
        return [p for m in (self.image_tower, self.text_tower) for p in m.parameters() if p.requires_grad]

    def head_parameters(self):
        towers = {id(p) for m in (self.image_tower, self.text_tower) for p in m.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in towers]
