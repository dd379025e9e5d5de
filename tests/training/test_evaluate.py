"""Whole-image inference: maps come back at image size; CAM and LayerCAM follow their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.network import build_model
from training.data import Record, Sample
from training.evaluate import fm_maps, minmax, pad_to_stride, predict_image, to_input


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder_name="resnet18", encoder_width=0.125, output_stride=8)).eval()
    return model


def test_whole_image_maps_are_cropped_back_to_the_image(tiny) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(70, 101, 3), dtype=np.uint8)  # not a multiple of the stride
    sample = Sample(Record("x", None, None, 1, "test"), image)  # type: ignore[arg-type]
    for mode in ("cam", "layercam", "pixel"):
        logits, fm, full = predict_image(tiny, sample, mode=mode)
        assert logits.shape == (2,)
        assert fm.shape == (9, 13) and full.shape == (70, 101)
        assert full.min() >= 0 and full.max() <= 1
    assert pad_to_stride(image, 8).shape == (72, 104, 3)


def test_cam_and_layercam_match_their_definitions(tiny) -> None:
    x = to_input(np.random.default_rng(1).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8),
                 tiny.config.mean, tiny.config.std)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        feats = tiny(x).features
    w = tiny.cls_head.fc.weight  # (K, C)
    cam = torch.einsum("bc,bchw->bhw", w[labels], feats)
    _, got_cam = fm_maps(tiny, x, labels, "cam")
    torch.testing.assert_close(got_cam, minmax(cam))
    # GAP + linear: dy_k/dA_c = w_kc / (h w), so LayerCAM = ReLU(sum_c ReLU(w_kc) A_c) / (h w)
    hw = feats.shape[-2] * feats.shape[-1]
    lcam = torch.relu(torch.einsum("bc,bchw->bhw", torch.relu(w[labels]) / hw, feats))
    _, got_lcam = fm_maps(tiny, x, labels, "layercam")
    torch.testing.assert_close(got_lcam, minmax(lcam), atol=1e-5, rtol=1e-4)


def test_pixel_map_is_the_fg_softmax(tiny) -> None:
    x = to_input(np.full((1, 32, 32, 3), 128, np.uint8), tiny.config.mean, tiny.config.std)
    _, fg = fm_maps(tiny, x, torch.tensor([0]), "pixel")
    with torch.no_grad():
        ref = torch.softmax(tiny(x).fg_logits, dim=1)[:, 1]
    torch.testing.assert_close(fg, ref)
