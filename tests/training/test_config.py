"""TrainConfig: YAML first, flags override, unknown keys and bad values refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import ConfigError, resolve_config


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
