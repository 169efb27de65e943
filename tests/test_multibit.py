"""Several code lengths from one run: one pass of the towers, a hash head and a set of class
proxies per length, the loss summed over lengths; the checkpoint encodes at any of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dcgh_dist.config import Config, load_config
from dcgh_dist.data.format import DatasetInfo

REPO = Path(__file__).resolve().parents[1]
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
    daph = load_config(overrides=["model.bits=[16, 32]", "train.method=daph"])  # both methods take a list
    assert daph.model.lengths == (16, 32)


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


def _daph_nets(cfg):
    from dcgh_dist.models.daph import build_daph_proxy_nets

    torch.manual_seed(0)
    return build_daph_proxy_nets(cfg.model, 3, image_feature_dim=6, text_feature_dim=5, class_hidden=32)


def test_daph_stage1_nets_a_code_layer_and_class_net_per_length():
    single = _daph_nets(load_config(overrides=["model.bits=16"]))
    multi = _daph_nets(load_config(overrides=["model.bits=[16, 32]"]))
    assert set(single.state_dict()) < set(multi.state_dict())  # a one-length checkpoint is unchanged
    assert not any("extra" in k for k in single.state_dict())
    # the extra length adds a code layer to each proxy net and its own class net, nothing else
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in set(multi.state_dict()) - set(single.state_dict())} == {
        "image.extra_codes", "text.extra_codes", "extra_classes.32"}
    batch = {"image_features": torch.randn(4, 6), "text_features": torch.randn(4, 5),
             "labels": torch.eye(3)[torch.arange(4) % 3]}
    multi.eval()
    out = multi(batch)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "image_codes": (4, 16), "image_codes@32": (4, 32), "text_codes": (4, 16), "text_codes@32": (4, 32),
        "class_codes": (3, 16), "class_codes@32": (3, 32)}
    for v in out.values():  # unit vectors, as the loss expects
        torch.testing.assert_close(v.norm(dim=1), torch.ones(len(v)))
    torch.testing.assert_close(out["text_codes"], multi.text(batch["text_features"], batch["labels"]))
    from dcgh_dist.models.daph import build_daph_proxy_nets

    torch.manual_seed(0)
    frozen = build_daph_proxy_nets(load_config(overrides=["model.bits=[16, 32]"]).model, 3, image_feature_dim=6,
                                   text_feature_dim=5, class_hidden=32, freeze_reference_layers=True)
    # the reference leaves the image proxy net's code layer untrained: so is every length's
    assert not any(p.requires_grad for p in frozen.image.extra_codes.parameters())
    assert all(p.requires_grad for p in frozen.text.extra_codes.parameters())


def test_daph_losses_are_the_weighted_sum_over_lengths():
    from dcgh_dist.losses import daph_hash_loss, daph_proxy_loss
    from dcgh_dist.train.proxy_codes import code_keys
    from dcgh_dist.train.objectives import build_objective

    cfg = load_config(overrides=["model.bits=[16, 32]", "loss.bits_weights=[1.0, 0.25]", "train.method=daph",
                                 "model.hash_dropout=0"])
    # multi-label rows, so that stage 2 has partial anchors under both positive rules
    mixed = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.float32)
    labels = mixed[torch.arange(8) % 6]
    batch = {"image_features": torch.randn(8, 6), "text_features": torch.randn(8, 5), "labels": labels}

    stage1 = build_objective("daph-proxy", cfg, INFO)
    nets = stage1.build_model().eval()  # eval: the class nets' dropout off, so the codes are fixed
    out = nets(batch)
    total, logged = stage1.loss(out, batch)
    want = {s: daph_proxy_loss(out[f"image_codes{s}"], out[f"text_codes{s}"], out[f"class_codes{s}"], labels,
                               cfg.daph)["total"] for s in ("", "@32")}
    torch.testing.assert_close(total, want[""] + 0.25 * want["@32"])
    assert logged["total@32"] == pytest.approx(want["@32"].item(), rel=1e-6)
    assert logged["total"] == pytest.approx((want[""] + 0.25 * want["@32"]).item(), rel=1e-6)
    total.backward()
    for layer in (nets.image.code, nets.image.extra_codes["32"], nets.text.extra_codes["32"],
                  nets.extra_classes["32"].net[3]):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0

    rng = np.random.default_rng(0)
    sign = lambda *shape: torch.as_tensor(np.where(rng.standard_normal(shape) >= 0, 1, -1), dtype=torch.int8)  # noqa: E731
    anchors = {"labels": mixed[torch.arange(12) % 6].to(torch.uint8),
               **{k: sign(3 if k.startswith("class") else 12, 32 if k.endswith("@32") else 16) for k in code_keys(cfg)}}
    assert set(anchors) == {"labels", "image_codes", "text_codes", "class_codes", "image_codes@32",
                            "text_codes@32", "class_codes@32"}
    stage2 = build_objective("daph-hash", cfg, INFO, anchors)
    model = stage2.build_model()
    codes = model(batch)
    total, logged = stage2.loss(codes, batch)
    a = {k: v.float() for k, v in anchors.items()}

    def one(s):
        return sum(daph_hash_loss(codes[f"{m}_codes{s}"], labels, a[f"image_codes{s}"], a[f"text_codes{s}"],
                                  a["labels"], a[f"class_codes{s}"], cfg.daph,
                                  getattr(cfg.daph, f"positive_rule_{m}"))["total"] for m in ("image", "text"))

    torch.testing.assert_close(total, one("") + 0.25 * one("@32"))
    total.backward()
    assert model.extra_text_heads["32"].fc.weight.grad.abs().sum() > 0


def test_multi_length_proxy_codes_round_trip(tmp_path):
    from dcgh_dist.train.proxy_codes import read_proxy_codes, write_proxy_codes

    cfg = load_config(overrides=["model.bits=[16, 32]", "train.method=daph"])
    rng = np.random.default_rng(0)
    codes = {"id": np.arange(10), "labels": np.eye(3)[rng.integers(0, 3, 10)],
             **{f"{n}{s}": rng.standard_normal((3 if n == "class_codes" else 10, k))
                for s, k in (("", 16), ("@32", 32)) for n in ("image_codes", "text_codes", "class_codes")}}
    path = str(tmp_path / "codes.npz")
    write_proxy_codes(path, codes, cfg, "fp")
    got = read_proxy_codes(path, cfg, "fp", 3)
    assert got["meta"]["lengths"] == [16, 32] and got["meta"]["bits"] == 16
    np.testing.assert_array_equal(got["text_codes@32"], np.where(codes["text_codes@32"] >= 0, 1, -1))
    assert got["class_codes@32"].shape == (3, 32)
    # a run with other lengths (even the same primary one) is refused
    for other, shown in (("model.bits=16", "model.bits=16"), ("model.bits=[16, 64]", r"model.bits=\[16, 64\]")):
        with pytest.raises(ValueError, match=rf"proxy codes of \[16, 32\] bits.*{shown}"):
            read_proxy_codes(path, load_config(overrides=[other]), "fp", 3)


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


def test_every_length_is_evaluated_from_one_pass_of_the_towers(tmp_path):
    """Validation, evaluation and the untrained baseline of a multi-length run score every head
    from one tower pass, each head's codes those of an encoder of that length alone."""
    from dcgh_dist.encoding.actor import EncodeBatches
    from dcgh_dist.models.checkpoint import read_checkpoint_files, save_untrained
    from dcgh_dist.models.encoder import Encoder
    from dcgh_dist.train.loop import encode_batches, validate

    cfg = load_config(overrides=["model.bits=[16, 64]"])
    path = save_untrained(str(tmp_path / "ck"), cfg, INFO)
    enc = Encoder.from_checkpoint(path, device="cpu")
    passes = []
    enc.model.image_tower.register_forward_hook(lambda *_: passes.append("image"))
    x = np.random.default_rng(0).standard_normal((6, 6)).astype(np.float32)
    both = enc.relaxed_at("image", x, (16, 64))
    assert passes == ["image"]
    for k in (16, 64):
        np.testing.assert_array_equal(both[k], Encoder.from_checkpoint(path, device="cpu", bits=k).relaxed("image", x))

    # the Ray Data actor of evaluation: a column per length; a row that could not be read stays zero
    rng = np.random.default_rng(1)
    batch = {"id": np.arange(6), "image_features": x, "text_features": rng.standard_normal((6, 5)).astype(np.float32),
             "image_error": np.array([""] * 5 + ["bad bytes"], dtype=object)}
    out = EncodeBatches({"checkpoint": read_checkpoint_files(path)}, ("image", "text"), packed=False,
                        device="cpu", bits=[16, 64])(batch)
    assert {"image_codes@16", "image_codes@64", "text_codes@16", "text_codes@64"} <= set(out)
    np.testing.assert_array_equal(out["image_codes@64"][:5], both[64][:5])
    assert not out["image_codes@16"][5].any() and out["image_error"][5] == "bad bytes"
    one = EncodeBatches({"checkpoint": read_checkpoint_files(path)}, ("text",), packed=True, device="cpu", bits=64)(batch)
    assert one["text_codes"].shape == (6, 8)  # one length: the plain column, as the encode job writes it

    # training-time validation: every length's val mAP from the same pass
    batches = [{"image_features": torch.from_numpy(x), "text_features": torch.from_numpy(batch["text_features"]),
                "labels": torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1]] * 2)}]
    passes.clear()
    by_length = encode_batches(enc.model, batches)
    assert passes == ["image"] and set(by_length) == {16, 64}
    np.testing.assert_array_equal(by_length[64]["image_codes"], both[64])
    val = validate(enc.model, batches)
    assert val["val_map"] == pytest.approx((val["val_map@16"] + val["val_map@64"]) / 2)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_multi_length_run_then_encode_one_length(tmp_path, demo_features, ray_cluster):
    from dcgh_dist.jobs import build_index as build_job
    from dcgh_dist.jobs import encode as encode_job
    from dcgh_dist.jobs import train as train_job

    from dcgh_dist.models.encoder import Encoder

    out = tmp_path / "run"
    result = train_job.main(["--dataset", demo_features, "--output-dir", str(out), "--epochs", "3",
                             "--batch-size", "64", "model.bits=[16, 32]", "--skip-baseline"]).metrics
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


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_daph_multi_length_run_on_two_workers(tmp_path, demo_features, ray_cluster):
    from dcgh_dist.jobs import encode as encode_job
    from dcgh_dist.jobs import train as train_job

    from dcgh_dist.data.format import scan_dataset
    from dcgh_dist.models.encoder import Encoder
    from dcgh_dist.train.proxy_codes import read_proxy_codes

    out = tmp_path / "run"
    result = train_job.main(["--dataset", demo_features, "--output-dir", str(out), "--method", "daph",
                             "--num-workers", "2", "--batch-size", "64", "--epochs", "4", "daph.proxy_epochs=3",
                             "model.bits=[16, 32]", "--skip-baseline"]).metrics
    # stage 1 wrote both lengths' proxy codes, each of which learnt the classes
    scan = scan_dataset(demo_features)
    codes = read_proxy_codes(result["proxy_codes"], load_config(overrides=["model.bits=[16, 32]"]),
                             scan.fingerprint, scan.info.num_classes)
    assert codes["image_codes"].shape == (1956, 16) and codes["text_codes@32"].shape == (1956, 32)
    stats = result["daph_stage1"]["by_bits"]
    assert stats["16"]["bits"] == 16 and stats["32"]["bits"] == 32
    for k in ("16", "32"):
        assert stats[k]["image_to_own_class"] < stats[k]["image_to_other_classes"], stats[k]
    # stage 2 trained every head, each scored like a one-length run's against the linear baseline
    assert set(result["by_bits"]) == {"16", "32"}
    assert result["by_bits"]["16"]["map_i2t"] == result["map_i2t"]
    for k in ("16", "32"):
        m = result["by_bits"][k]
        assert m["method"] == "daph" and m["map_t2i"] > m["linear"]["map_t2i"] * 0.8, (k, m)
    hist = result["history"][-1]
    assert {"loss_total@16", "loss_total@32", "val_map@16", "val_map@32"} <= set(hist)
    # the checkpoint encodes at its extra length
    enc_out = tmp_path / "codes"
    encode_job.main(["--checkpoint", str(out / "checkpoint"), "--dataset", demo_features, "--modality", "image",
                     "--output", str(enc_out), "--bits", "32", "--splits", "query"])
    from dcgh_dist.index.build import scan_code_source

    src = scan_code_source(str(enc_out / "image"))
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert src.bits == 32 and src.model_fingerprint == meta["fingerprint"]
    assert meta["config"]["model"]["extra_bits"] == [32] and meta["config"]["train"]["method"] == "daph"
    assert Encoder.from_checkpoint(str(out / "checkpoint"), device="cpu", bits=32).bits == 32
