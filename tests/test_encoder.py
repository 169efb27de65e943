"""The one inference path: raw inputs and preprocessed batches give the same codes."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcgh_dist.data.format import DatasetInfo
from dcgh_dist.models.inputs import preprocessor_for
from dcgh_dist.codes import pack_relaxed
from dcgh_dist.models.encoder import Encoder

REPO = Path(__file__).resolve().parents[1]
INFO = DatasetInfo(name="t", num_classes=3, class_names=("a", "b", "c"))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    sys.path.insert(0, str(REPO / "tests"))
    from test_encode_job import make_checkpoint

    return Encoder.from_checkpoint(make_checkpoint(str(tmp_path_factory.mktemp("ck") / "c"), INFO), device="cpu")


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_raw_inputs_equal_the_training_pipeline(encoder):
    texts, images = ["a red square", "two dogs on grass", "x"], [_png(0), _png(1)]
    # training's own evaluation-time preprocessing, then the model by hand
    pre = preprocessor_for(encoder.meta.config, INFO)
    batch = pre({"id": np.arange(2), "labels": [[0], [1]], "image": np.array(images, dtype=object),
                 "text": np.array(texts[:2], dtype=object)})
    import torch

    with torch.no_grad():
        want_t = pack_relaxed(encoder.model.encode_text(torch.as_tensor(batch["text"])).numpy())
        want_i = pack_relaxed(encoder.model.encode_image(torch.as_tensor(batch["image"])).numpy())
    got_t = encoder.encode_texts(texts)
    got_i = encoder.encode_images(images)
    assert got_t.errors == ["", "", ""] and got_i.errors == ["", ""]
    assert np.array_equal(got_t.codes[:2], want_t) and np.array_equal(got_i.codes, want_i)
    assert got_t.codes.shape == (3, encoder.bits // 8) and got_t.codes.dtype == np.uint8
    relaxed = encoder.encode_texts(texts[:2], packed=False).codes
    assert relaxed.dtype == np.float32 and np.abs(relaxed).max() < 1 and np.array_equal(pack_relaxed(relaxed), want_t)


def test_bad_raw_inputs_are_errors_with_zero_codes(encoder):
    out = encoder.encode_images([_png(2), b"not an image", b""])
    assert out.errors[0] == "" and "cannot be decoded" in out.errors[1] and "empty" in out.errors[2]
    assert not out.codes[1:].any() and out.codes[0].any()
    t = encoder.encode_texts(["ok", "   "])
    assert t.errors[0] == "" and "empty" in t.errors[1] and not t.codes[1].any()


def test_live_model_and_bf16(encoder):
    batch = encoder.preprocessor(("text",))({"id": np.arange(4), "text": np.array(["a", "b c", "d e f", "g"], dtype=object)})
    live = Encoder(encoder.model)  # a model in training, no checkpoint metadata: what validation uses
    assert np.array_equal(live.codes("text", batch["text"]), encoder.codes("text", batch["text"]))
    assert encoder.bit_agreement("text", batch["text"]) > 0.9
    with pytest.raises(ValueError, match="no preprocessor"):
        live.preprocessor()
