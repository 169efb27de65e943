"""The cross-modal hasher: an image tower and a text tower, each followed by a hash head."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn


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
    """

    def __init__(
        self,
        image_tower: nn.Module,
        text_tower: nn.Module,
        bits: int,
        dropout: float = 0.2,
        image_key: str = "image",
        text_key: str = "text",
    ):
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_head = HashHead(image_tower.out_dim, bits, dropout)
        self.text_head = HashHead(text_tower.out_dim, bits, dropout)
        self.bits = bits
        self.image_key = image_key
        self.text_key = text_key

    def encode_image(self, image: Tensor) -> Tensor:
        return self.image_head(self.image_tower(image))

    def encode_text(self, text: Tensor) -> Tensor:
        return self.text_head(self.text_tower(text))

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if self.image_key in batch:
            out["image_codes"] = self.encode_image(batch[self.image_key])
        if self.text_key in batch:
            out["text_codes"] = self.encode_text(batch[self.text_key])
        if not out:
            raise KeyError(f"batch has neither {self.image_key!r} nor {self.text_key!r}")
        return out

    def tower_parameters(self):
        return [p for m in (self.image_tower, self.text_tower) for p in m.parameters() if p.requires_grad]

    def head_parameters(self):
        return [p for m in (self.image_head, self.text_head) for p in m.parameters() if p.requires_grad]
