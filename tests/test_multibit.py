"""Several code lengths from one run: one pass of the towers, a hash head and a set of class
proxies per length, the loss summed over lengths; the checkpoint encodes at any of them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcgh_dist.config import Config, load_config
from dcgh_dist.data.format import DatasetInfo

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))
INFO = DatasetInfo("f", 3, ("a", "b", "c"), "image_features", "text_features", 6, 5)


def test_bits_as_a_list():
    cfg = load_config(overrides=["model.bits=[16, 32, 64]", "loss.bits_weights=[1, 0.5, 0.25]"])
    assert cfg.model.bits == 16 and cfg.model.extra_bits == (32, 64) and cfg.model.lengths == (16, 32, 64)
    assert Config.from_dict(cfg.to_dict()) == cfg  # saved and read back the same
    assert load_config(overrides=["model.bits=32"]).model.lengths == (32,)
    with pytest.raises(ValueError, match="twice"):
        load_config(overrides=["model.bits=[16, 16]"])
    with pytest.raises(ValueError, match="one of"):
        load_config(overrides=["model.bits=[16, 24]"])
    with pytest.raises(ValueError, match="bits_weights has 1 weights for 2"):
        load_config(overrides=["model.bits=[16, 32]", "loss.bits_weights=[1]"])
    with pytest.raises(ValueError, match="train.method=dcgh only"):
        load_config(overrides=["model.bits=[16, 32]", "train.method=daph"])


def _model(cfg):
    from dcgh_dist.models import build_model

    torch.manual_seed(0)
    return build_model(cfg.model, image_feature_dim=6, text_feature_dim=5)


def test_one_tower_pass_a_head_per_length():
    single = _model(load_config(overrides=["model.bits=16"]))
    multi = _model(load_config(overrides=["model.bits=[16, 32]"]))
    assert set(single.state_dict()) < set(multi.state_dict())  # a one-length model is unchanged
    assert not any("extra" in k for k in single.state_dict())
    x = {"image_features": torch.randn(4, 6), "text_features": torch.randn(4, 5)}
    multi.eval()
    out = multi(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "image_codes": (4, 16), "image_codes@32": (4, 32), "text_codes": (4, 16), "text_codes@32": (4, 32)}
    torch.testing.assert_close(out["image_codes@32"], multi.encode_image(x["image_features"], bits=32))
    torch.testing.assert_close(out["text_codes"], multi.encode_text(x["text_features"]))
    with pytest.raises(ValueError, match=r"\[16, 32\] bits, not 64"):
        multi.encode_image(x["image_features"], bits=64)


def test_the_loss_is_the_weighted_sum_over_lengths():
    from dcgh_dist.losses import dcgh_loss
    from dcgh_dist.train.objectives import build_objective

    cfg = load_config(overrides=["model.bits=[16, 32]", "loss.bits_weights=[1.0, 0.5]", "model.hash_dropout=0"])
    obj = build_objective("dcgh", cfg, INFO)
    model = obj.build_model()
    batch = {"image_features": torch.randn(8, 6), "text_features": torch.randn(8, 5),
             "labels": torch.eye(3)[torch.arange(8) % 3]}
    codes = model(batch)
    total, logged = obj.loss(codes, batch)
    want = sum(w * dcgh_loss(codes[f"image_codes{s}"], codes[f"text_codes{s}"], batch["labels"],
                             obj.proxies[k](), cfg.loss)["total"]
               for k, w, s in ((16, 1.0, ""), (32, 0.5, "@32")))
    torch.testing.assert_close(total, want)
    assert logged["total"] == pytest.approx(float(want.detach()), rel=1e-6)
    total.backward()
    for head in (model.image_head, model.extra_image_heads["32"], model.extra_text_heads["32"]):
        assert head.fc.weight.grad is not None and head.fc.weight.grad.abs().sum() > 0
    assert all(p.weight.grad is not None for p in obj.proxies.values())
    state = obj.extra_state()  # the primary length keeps the one-length names
    assert "weight" in state and "@32.weight" in state
    fresh = build_objective("dcgh", cfg, INFO)
    fresh.load(state, obj.extra_train_state())
    torch.testing.assert_close(fresh.proxies[32].weight, obj.proxies[32].weight)


def test_a_multi_length_checkpoint_encodes_at_any_length(tmp_path):
    from dcgh_dist.models.checkpoint import save_untrained
    from dcgh_dist.models.encoder import Encoder

    cfg = load_config(overrides=["model.bits=[16, 64]"])
    path = save_untrained(str(tmp_path / "ck"), cfg, INFO)
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    for bits in (None, 16, 64):
        enc = Encoder.from_checkpoint(path, device="cpu", bits=bits)
        assert enc.bits == (bits or 16)
        assert enc.codes("image", x).shape == (5, (bits or 16) // 8)
    with pytest.raises(ValueError, match="not 32"):
        Encoder.from_checkpoint(path, device="cpu", bits=32)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_multi_length_run_then_encode_one_length(tmp_path, demo_features, ray_cluster):
    import build_index as build_job  # jobs/build_index.py
    import encode as encode_job  # jobs/encode.py
    import train as train_job  # jobs/train.py

    from dcgh_dist.models.encoder import Encoder

    out = tmp_path / "run"
    result = train_job.main(["--dataset", demo_features, "--output-dir", str(out), "--epochs", "3",
                             "--batch-size", "64", "model.bits=[16, 32]", "--skip-baseline"])
    assert set(result["by_bits"]) == {"16", "32"}
    assert result["by_bits"]["16"]["map_i2t"] == result["map_i2t"]  # the primary length is the top level
    for k in ("16", "32"):
        m = result["by_bits"][k]
        assert m["map_i2t"] > m["linear"]["map_i2t"] * 0.5 and m["dataset"] == result["dataset"]
    hist = result["history"][-1]
    assert {"val_map@16", "val_map@32", "loss_total@16", "loss_total@32"} <= set(hist)
    assert hist["val_map"] == pytest.approx((hist["val_map@16"] + hist["val_map@32"]) / 2)

    codes = tmp_path / "codes"
    encode_job.main(["--checkpoint", str(out / "checkpoint"), "--dataset", demo_features, "--modality", "text",
                     "--output", str(codes), "--bits", "32", "--splits", "query"])
    idx = tmp_path / "idx"
    manifest = build_job.main(["--codes", str(codes / "text"), "--output", str(idx)])
    assert json.loads((idx / "manifest.json").read_text())["bits"] == 32, manifest
    # the codes are the 32-bit head's
    from dcgh_dist.index.build import read_slices, scan_code_source

    src = scan_code_source(str(codes / "text"))
    ids, packed = read_slices(str(codes / "text"), [(f.path, 0, f.rows) for f in src.files], None)
    from dcgh_dist.baselines import read_feature_rows
    from dcgh_dist.data.format import read_dataset_info

    rows = read_feature_rows(demo_features, read_dataset_info(demo_features), None)
    feats = dict(zip(rows["id"].tolist(), rows["text_features"].astype(np.float32)))
    enc = Encoder.from_checkpoint(str(out / "checkpoint"), device="cpu", bits=32)
    want = enc.codes("text", np.stack([feats[int(i)] for i in ids[:50]]))
    np.testing.assert_array_equal(packed[:50], want)
