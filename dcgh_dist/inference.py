"""Batch inference: a callable class that Ray Data runs in an actor pool (model loaded once per
actor, in ``__init__``), also usable directly in a single process."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class HashEncoder:
    """Preprocessed batch -> relaxed codes (float32, tanh outputs) per modality.

    ``checkpoint_dir=None`` builds the untrained model of ``config`` with the training seed, i.e.
    exactly the model training started from: the baseline the trained model is compared to.
    Extra columns listed in ``passthrough`` are copied to the output.
    """

    def __init__(
        self,
        checkpoint_dir: str | None,
        config: dict[str, Any] | None = None,
        dataset_info: str | None = None,
        *,
        device: str = "auto",
        passthrough: tuple[str, ...] = ("id", "labels", "split"),
    ):
        from dcgh_dist.config import Config
        from dcgh_dist.data.format import DatasetInfo
        from dcgh_dist.models import build_model
        from dcgh_dist.train.checkpoint import load_model

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if checkpoint_dir is not None:
            self.model, _ = load_model(checkpoint_dir, device=self.device)
        else:
            if config is None or dataset_info is None:
                raise ValueError("an untrained HashEncoder needs config and dataset_info")
            cfg = Config.from_dict(config)
            info = DatasetInfo.from_json(dataset_info)
            torch.manual_seed(cfg.train.seed)
            self.model = build_model(
                cfg.model, image_feature_dim=info.image_feature_dim, text_feature_dim=info.text_feature_dim
            ).to(self.device).eval()
        self.passthrough = passthrough

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {
            k: torch.as_tensor(np.asarray(v)).to(self.device)
            for k, v in batch.items()
            if k in (self.model.image_key, self.model.text_key)
        }
        codes = self.model(inputs)
        out = {k: batch[k] for k in self.passthrough if k in batch}
        for k, v in codes.items():
            out[k] = v.float().cpu().numpy()
        return out
