"""Network shapes, CAM consistency, lr groups, checkpoints and local pretrained weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.encoders import ResNetEncoder, ViTEncoder, load_pretrained
from model.errors import CheckpointError, InputSizeError, ModelConfigError, PretrainedWeightsError
from model.network import PixelCAM, build_model, param_groups

RESNET_WIDTH_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("encoder", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_resnet_shapes(encoder: str, output_stride: int) -> None:
    cfg = ModelConfig(encoder_name=encoder, encoder_width=0.25, output_stride=output_stride, input_size=64)
    model = build_model(cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    fm = 64 // output_stride
    c = RESNET_WIDTH_CHANNELS[encoder] // 4
    assert model.encoder.out_channels == c
    assert out.features.shape == (2, c, fm, fm)
    assert out.class_logits.shape == (2, 2)
    assert out.fg_logits.shape == (2, 2, fm, fm)
    assert torch.isfinite(out.class_logits).all()


def test_resnet_dilation_replaces_stride() -> None:
    enc = ResNetEncoder("resnet18", width=0.25, output_stride=8)
    assert enc.layer3[0].conv1.stride == (1, 1)
    assert enc.layer4[1].conv1.dilation == (4, 4)
    assert enc.layer4[0].conv1.dilation == (2, 2)  # first block keeps the previous stage's dilation
    enc16 = ResNetEncoder("resnet50", width=0.25, output_stride=16)
    assert enc16.layer3[0].conv2.stride == (2, 2)
    assert enc16.layer4[0].conv2.stride == (1, 1)
    assert enc16.layer4[1].conv2.dilation == (2, 2)


def test_torchvision_parameter_names() -> None:
    keys = set(ResNetEncoder("resnet50", width=0.25).state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.weight", "layer4.2.conv3.weight", "layer3.5.bn2.bias"):
        assert key in keys
    assert not any(k.startswith("fc.") for k in keys)


def test_vit_shape_and_size_refusal() -> None:
    model = build_model(ModelConfig(encoder_name="vit_tiny", output_stride=16, encoder_width=0.25)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.features.shape == (1, 48, 14, 14)
    assert out.fg_logits.shape == (1, 2, 14, 14)
    assert out.class_logits.shape == (1, 2)
    with pytest.raises(InputSizeError, match="224x224"):
        model(torch.randn(1, 3, 256, 256))


def test_vit_full_width_is_deit_tiny() -> None:
    enc = ViTEncoder()
    assert enc.out_channels == 192
    assert len(enc.blocks) == 12
    assert enc.pos_embed.shape == (1, 197, 192)
    assert 5.0e6 < sum(p.numel() for p in enc.parameters()) < 6.0e6


def test_config_refuses_bad_values() -> None:
    with pytest.raises(ModelConfigError, match="output_stride must be 16"):
        ModelConfig(encoder_name="vit_tiny", output_stride=8)
    with pytest.raises(ModelConfigError, match="input_size must be 224"):
        ModelConfig(encoder_name="vit_tiny", output_stride=16, input_size=256)
    with pytest.raises(ModelConfigError, match="unknown encoder_name"):
        ModelConfig(encoder_name="resnet101")
    with pytest.raises(ModelConfigError, match="positive_class"):
        ModelConfig(positive_class="tumor")
    with pytest.raises(ModelConfigError, match="RGB triplet"):
        ModelConfig(foreground_color=(255, 0))
    with pytest.raises(ModelConfigError, match="one RGB triplet per class"):
        ModelConfig(class_colors=((1, 2, 3),))
    with pytest.raises(ModelConfigError, match="unknown model config keys"):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "decoder": "unet"})


def test_config_dict_round_trip() -> None:
    cfg = ModelConfig(encoder_name="resnet34", encoder_width=0.5, output_stride=16, input_mpp=0.5,
                      class_names=("normal", "tumor"), positive_class="tumor", foreground_name="Tumor")
    data = cfg.to_dict()
    assert isinstance(data["class_colors"][0], list)
    assert ModelConfig.from_dict(data) == cfg
    assert cfg.fm_size == 14 and cfg.positive_index == 1


def test_cam_matches_logits() -> None:
    model = build_model(ModelConfig(encoder_width=0.25, input_size=64)).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 64, 64))
        for c in range(2):
            cam = model.cam(out.features, c)
            assert cam.shape == (3, 8, 8)
            recon = cam.mean(dim=(1, 2)) + model.cls_head.fc.bias[c]
            torch.testing.assert_close(recon, out.class_logits[:, c], rtol=1e-4, atol=1e-5)
        per_image = model.cam(out.features, torch.tensor([1, 0, 1]))
        torch.testing.assert_close(per_image[1], model.cam(out.features, 0)[1])


def test_dropout_only_in_training() -> None:
    model = build_model(ModelConfig(encoder_width=0.25, input_size=64, cls_head_dropout=0.5))
    feats = torch.randn(4, model.encoder.out_channels, 8, 8)
    model.eval()
    torch.testing.assert_close(model.cls_head(feats), model.cls_head(feats))
    model.train()
    assert not torch.allclose(model.cls_head(feats), model.cls_head(feats))


def test_param_groups_resnet_and_vit() -> None:
    model = build_model(ModelConfig(encoder_width=0.25, input_size=64))
    groups = param_groups(model, lr=1e-3, head_lr_ratio=10)
    by_name = {g["name"]: g for g in groups}
    assert by_name["base"]["lr"] == pytest.approx(1e-3)
    assert by_name["heads"]["lr"] == pytest.approx(1e-2)
    fast_ids = {id(p) for p in by_name["heads"]["params"]}
    named = dict(model.named_parameters())
    assert id(named["encoder.layer4.0.conv1.weight"]) in fast_ids
    assert id(named["cls_head.fc.weight"]) in fast_ids
    assert id(named["pixel_head.conv.weight"]) in fast_ids
    assert id(named["encoder.layer3.0.conv1.weight"]) not in fast_ids
    total = sum(len(g["params"]) for g in groups)
    assert total == len(named)
    torch.optim.SGD(groups, lr=1e-3, momentum=0.9)  # the groups are accepted as they are

    vit = build_model(ModelConfig(encoder_name="vit_tiny", output_stride=16, encoder_width=0.25))
    (group,) = param_groups(vit, lr=1e-3)
    assert group["lr"] == pytest.approx(1e-3)
    assert len(group["params"]) == len(list(vit.parameters()))


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    cfg = ModelConfig(encoder_width=0.25, input_size=64, output_stride=16, input_mpp=0.75)
    model = build_model(cfg)
    model.train()
    model(torch.randn(4, 3, 64, 64))  # move BN running stats away from their init
    model.eval()
    path = save_checkpoint(tmp_path / "sub" / "ckpt.pt", model, cfg,
                           train_config={"lr": 1e-3, "data": tmp_path}, extra={"epoch": 3})
    loaded, cfg2, payload = load_checkpoint(path)
    assert isinstance(loaded, PixelCAM) and not loaded.training
    assert cfg2 == cfg
    assert payload["train_config"] == {"lr": 1e-3, "data": str(tmp_path)}
    assert payload["extra"]["epoch"] == 3
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    torch.testing.assert_close(a.class_logits, b.class_logits)
    torch.testing.assert_close(a.fg_logits, b.fg_logits)


def test_checkpoint_extra_with_numpy_values_loads(tmp_path: Path) -> None:
    cfg = ModelConfig(encoder_width=0.25, input_size=64)
    model = build_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 64, 64)).class_logits.sum().backward()
    opt.step()
    extra = {"row": {"acc": np.float64(0.75), "epoch": np.int64(4)}, "curve": np.arange(3.0),
             "optimizer": opt.state_dict(), "out": tmp_path}
    path = save_checkpoint(tmp_path / "np.pt", model, cfg, extra=extra)
    _, _, payload = load_checkpoint(path)
    row = payload["extra"]["row"]
    assert row == {"acc": 0.75, "epoch": 4} and type(row["acc"]) is float and type(row["epoch"]) is int
    torch.testing.assert_close(payload["extra"]["curve"], torch.arange(3.0, dtype=torch.float64))
    assert payload["extra"]["out"] == str(tmp_path)
    fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fresh.load_state_dict(payload["extra"]["optimizer"])  # optimizer state survives for resuming
    assert fresh.state_dict()["state"][0]["momentum_buffer"].shape == next(model.parameters()).shape


def test_checkpoint_with_raw_numpy_scalars_loads(tmp_path: Path) -> None:
    cfg = ModelConfig(encoder_width=0.25, input_size=64)
    model = build_model(cfg)
    path = save_checkpoint(tmp_path / "a.pt", model, cfg)
    payload = torch.load(path, weights_only=True)
    payload["extra"] = {"acc": np.float64(0.5), "n": np.int64(2)}  # as a checkpoint written without _safe
    torch.save(payload, path)
    _, _, loaded = load_checkpoint(path)
    assert loaded["extra"] == {"acc": 0.5, "n": 2}


def test_checkpoint_refuses_foreign_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="not a pixelcam checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_load_pretrained_torchvision_style(tmp_path: Path) -> None:
    source = ResNetEncoder("resnet18", width=0.25)
    state = dict(source.state_dict())
    state["fc.weight"] = torch.randn(1000, source.out_channels)
    state["fc.bias"] = torch.randn(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    target = ResNetEncoder("resnet18", width=0.25, output_stride=8)  # dilation does not change shapes
    report = load_pretrained(target, path)
    assert report.missing == [] and report.unexpected == []
    torch.testing.assert_close(target.layer2[0].conv1.weight, source.layer2[0].conv1.weight)


def test_load_pretrained_refuses_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "wide.pth"
    torch.save(ResNetEncoder("resnet18", width=0.5).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="encoder_width=1.0"):
        load_pretrained(ResNetEncoder("resnet18", width=0.25), path)
    with pytest.raises(PretrainedWeightsError, match="never downloads"):
        load_pretrained(ResNetEncoder("resnet18", width=0.25), tmp_path / "nope.pth")
