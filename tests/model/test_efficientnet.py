"""EfficientNet-Lite: the checked checkpoint mapping, dilation for output stride 8/16, and sensible ImageNet outputs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model.config import LITE_MEAN, LITE_STD, ModelConfig
from model.efficientnet import (
    EfficientNetLiteEncoder,
    imagenet_classifier,
    lite_checkpoint_path,
    load_efficientnet_lite,
)
from model.errors import ModelConfigError, PretrainedWeightsError
from model.export import check_parity, export_onnx
from model.network import build_model
from model.runtime import read_model_metadata


@pytest.fixture(scope="module")
def lite0() -> tuple[EfficientNetLiteEncoder, torch.nn.Linear]:
    encoder = EfficientNetLiteEncoder("efficientnet_lite0", output_stride=32).eval()
    report = load_efficientnet_lite(encoder)
    assert report.tensors == len(encoder.state_dict())
    return encoder, imagenet_classifier(report)


def test_every_checkpoint_tensor_is_used_and_a_wrong_file_is_refused(tmp_path: Path) -> None:
    state = torch.load(lite_checkpoint_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    encoder = EfficientNetLiteEncoder("efficientnet_lite0")
    report = load_efficientnet_lite(encoder)
    assert report.tensors == len(state) - 2  # all but the ImageNet classifier _fc.weight / _fc.bias
    assert set(report.classifier) == {"_fc.weight", "_fc.bias"}
    np.testing.assert_array_equal(encoder.blocks[3].depthwise_conv.weight.detach().numpy(),
                                  state["_blocks.3._depthwise_conv.weight"].numpy())
    broken = dict(state)
    del broken["_blocks.7._bn1.running_var"]
    torch.save(broken, tmp_path / "missing.pth")
    with pytest.raises(PretrainedWeightsError, match="1 encoder tensors missing"):
        load_efficientnet_lite(EfficientNetLiteEncoder("efficientnet_lite0"), tmp_path / "missing.pth")
    reshaped = dict(state)
    reshaped["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    torch.save(reshaped, tmp_path / "shape.pth")
    with pytest.raises(PretrainedWeightsError, match="other shapes"):
        load_efficientnet_lite(EfficientNetLiteEncoder("efficientnet_lite0"), tmp_path / "shape.pth")
    with pytest.raises(PretrainedWeightsError, match="no ImageNet weights are known"):
        lite_checkpoint_path("efficientnet_lite9")


@pytest.mark.parametrize(("stride", "cells"), [(8, (28, 28, 32, 40)), (16, (14, 14, 16, 20)), (32, (7, 7, 8, 10))])
def test_output_stride_by_dilation(stride: int, cells: tuple[int, int, int, int]) -> None:
    encoder = EfficientNetLiteEncoder("efficientnet_lite0", output_stride=stride).eval()
    with torch.no_grad():
        a = encoder(torch.zeros(1, 3, 224, 224))
        b = encoder(torch.zeros(1, 3, 256, 320))
    assert a.shape == (1, 1280, cells[0], cells[1]) and b.shape == (1, 1280, cells[2], cells[3])
    with pytest.raises(ModelConfigError, match="output_stride"):
        EfficientNetLiteEncoder("efficientnet_lite0", output_stride=4)


def _imagenet_probs(encoder: EfficientNetLiteEncoder, fc: torch.nn.Linear, tiles: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(LITE_MEAN).view(1, 3, 1, 1), torch.tensor(LITE_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.softmax(fc(encoder((x - mean) / std).mean(dim=(2, 3))), dim=1).numpy()


def test_the_pretrained_network_sees_real_images(lite0, glas_dir: Path) -> None:
    """ImageNet outputs are confident on a real H&E tile and different for a white tile (weights are right)."""
    encoder, fc = lite0
    image = cv2.cvtColor(cv2.imread(str(glas_dir / "images" / "testA_1.png")), cv2.COLOR_BGR2RGB)
    tissue = cv2.resize(image[:300, :300], (224, 224), interpolation=cv2.INTER_AREA)
    white = np.full((224, 224, 3), 255, np.uint8)
    probs = _imagenet_probs(encoder, fc, np.stack([tissue, white]))
    entropy = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=1)
    assert probs[0].max() > 0.1 and entropy[0] < np.log(1000) - 2  # far from the uniform 1/1000
    assert probs[0].argmax() != probs[1].argmax() and np.abs(probs[0] - probs[1]).sum() > 1.0
    # the same network with random weights (BatchNorm at its initial statistics) is nowhere near as sure
    random = EfficientNetLiteEncoder("efficientnet_lite0", output_stride=32).eval()
    assert _imagenet_probs(random, fc, tissue[None]).max() < probs[0].max()


def test_a_pixelcam_on_lite0_exports_dense_with_parity(tmp_path: Path, glas_dir: Path) -> None:
    cfg = ModelConfig(encoder_name="efficientnet_lite0", output_stride=8, mean=LITE_MEAN, std=LITE_STD)
    model = build_model(cfg).eval()
    load_efficientnet_lite(model.encoder)  # type: ignore[arg-type]
    path = export_onnx(model, cfg, tmp_path / "lite0.onnx")
    meta = read_model_metadata(path)
    assert meta.dense and meta.encoder == "efficientnet_lite0" and meta.fm_size == 28
    image = cv2.cvtColor(cv2.imread(str(glas_dir / "images" / "testA_2.png")), cv2.COLOR_BGR2RGB)
    tiles = np.stack([cv2.resize(image[:224, :224], (224, 224)), cv2.resize(image[200:424, 300:524], (224, 224))])
    diffs = check_parity(model, path, tiles, atol=1e-4)
    assert max(diffs.values()) <= 1e-4


def test_lite_widths_come_from_the_variant() -> None:
    with pytest.raises(ModelConfigError, match="encoder_width must be 1.0"):
        ModelConfig(encoder_name="efficientnet_lite0", encoder_width=0.5)


def test_the_stage5_trunk_takes_its_tensors_and_leaves_aside_exactly_the_cut_stages(tmp_path: Path) -> None:
    state = torch.load(lite_checkpoint_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    encoder = EfficientNetLiteEncoder("efficientnet_lite0_s5", output_stride=8).eval()
    report = load_efficientnet_lite(encoder)
    cut = [k for k in state if k.startswith(("_conv_head.", "_bn1.")) or
           (k.startswith("_blocks.") and int(k.split(".")[1]) >= 11)]
    assert len(encoder.blocks) == 11 and encoder.out_channels == 112
    assert report.tensors == len(encoder.state_dict()) == len(state) - 2 - len(cut) and report.cut_away == len(cut)
    np.testing.assert_array_equal(encoder.blocks[10].project_conv.weight.detach().numpy(),
                                  state["_blocks.10._project_conv.weight"].numpy())
    with torch.no_grad():
        assert encoder(torch.zeros(1, 3, 224, 320)).shape == (1, 112, 28, 40)
    # a tensor of a stage the trunk keeps is still required; a stray tensor is still refused
    broken = {k: v for k, v in state.items() if k != "_blocks.10._bn2.bias"}
    torch.save(broken, tmp_path / "missing.pth")
    with pytest.raises(PretrainedWeightsError, match="1 encoder tensors missing"):
        load_efficientnet_lite(EfficientNetLiteEncoder("efficientnet_lite0_s5"), tmp_path / "missing.pth")
    torch.save({**state, "_extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(PretrainedWeightsError, match="1 file tensors unused"):
        load_efficientnet_lite(EfficientNetLiteEncoder("efficientnet_lite0_s5"), tmp_path / "extra.pth")


def test_the_stage5_trunk_trains_its_last_block_and_the_heads_fast() -> None:
    from model.network import param_groups

    model = build_model(ModelConfig(encoder_name="efficientnet_lite0_s5", mean=LITE_MEAN, std=LITE_STD))
    groups = {g["name"]: g for g in param_groups(model, 1e-4, 10.0)}
    fast = {id(p) for p in groups["heads"]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in fast}
    assert groups["heads"]["lr"] == pytest.approx(1e-3)
    assert any(n.startswith("encoder.blocks.10.") for n in names) and any(n.startswith("pixel_head.") for n in names)
    assert not any(n.startswith("encoder.blocks.9.") for n in names)
