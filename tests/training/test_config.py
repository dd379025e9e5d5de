"""TrainConfig: YAML first, flags override, unknown keys and bad values refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import ConfigError, TrainConfig, resolve_config


def test_yaml_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nlr: 0.01\nclass_names: [a, b]\npositive_class: b\nlow_res: true\n")
    cfg = resolve_config(["--config", str(path), "--lr", "0.5", "--no-low-res"])
    assert cfg.epochs == 7 and cfg.lr == 0.5 and cfg.low_res is False
    assert cfg.class_names == ("a", "b")


def test_quick_and_unknown_keys(tmp_path: Path) -> None:
    cfg = resolve_config(["--quick"])
    assert cfg.epochs == 1 and cfg.max_images > 0
    path = tmp_path / "bad.yaml"
    path.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown config keys"):
        resolve_config(["--config", str(path)])
    with pytest.raises(ConfigError, match="bg_area_frac"):
        resolve_config(["--bg-area-frac", "0"])
    with pytest.raises(ConfigError, match="resnet"):
        resolve_config(["--encoder-name", "vit_tiny"])
    with pytest.raises(ConfigError, match="stage"):
        resolve_config(["--stage", "nope"])


def test_hash_ignores_bookkeeping() -> None:
    a = resolve_config(["--run-dir", "x"])
    b = resolve_config(["--run-dir", "y", "--threads", "1"])
    c = resolve_config(["--lr", "0.123"])
    assert a.sha256() == b.sha256() != c.sha256()


def test_pretrained_by_name_loads_the_installed_imagenet_weights() -> None:
    import torch

    from model.efficientnet import lite_checkpoint_path
    from model.network import build_model
    from training.stages import StageError, load_encoder_weights, model_config

    cfg = TrainConfig(encoder_name="efficientnet_lite0", encoder_width=1.0, pretrained="efficientnet_lite0")
    mcfg = model_config(cfg)
    assert mcfg.mean == (0.5, 0.5, 0.5) and mcfg.std == (0.5, 0.5, 0.5)  # the checkpoints' normalisation
    model = build_model(mcfg)
    load_encoder_weights(model, cfg)
    state = torch.load(lite_checkpoint_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert torch.equal(model.encoder.conv_head.weight, state["_conv_head.weight"])
    with pytest.raises(StageError, match="set encoder_name: efficientnet_lite0"):
        load_encoder_weights(build_model(model_config(TrainConfig())), TrainConfig(pretrained="efficientnet_lite0"))


def test_an_unknown_encoder_is_refused_when_the_config_is_made() -> None:
    """The service checks training jobs with make_config: a bad encoder must be a 422 there, not a failed run."""
    from training.config import ConfigError, make_config

    with pytest.raises(ConfigError, match="unknown encoder_name 'foo'"):
        make_config({"encoder_name": "foo"})
    with pytest.raises(ConfigError, match="epochs must be an integer"):
        make_config({"epochs": "five"})
