"""Model-test fixtures: real tissue tiles cut from GlaS and one small exported artefact per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import ModelConfig
from model.export import calibrate_batchnorm, export_onnx
from model.network import PixelCAM, build_model

GLAS_IMAGES = ("testA_1", "train_2", "testB_3")


def cut_tiles(glas_dir: Path, size: int = 224) -> np.ndarray:
    """Two size x size crops (top-left and centre) from each of a few GlaS images: uint8 (N, S, S, 3)."""
    tiles = []
    for name in GLAS_IMAGES:
        image = np.asarray(Image.open(glas_dir / "images" / f"{name}.png").convert("RGB"))
        h, w = image.shape[:2]
        tiles.append(image[:size, :size])
        tiles.append(image[(h - size) // 2:(h + size) // 2, (w - size) // 2:(w + size) // 2])
    return np.ascontiguousarray(np.stack(tiles))


@pytest.fixture(scope="session")
def tissue_tiles(glas_dir: Path) -> np.ndarray:
    tiles = cut_tiles(glas_dir)
    assert tiles.shape == (6, 224, 224, 3) and tiles.dtype == np.uint8
    return tiles


def small_model(cfg: ModelConfig, tiles: np.ndarray, seed: int = 0) -> PixelCAM:
    """A random model whose BN statistics come from `tiles`, so its outputs are not saturated."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    calibrate_batchnorm(model, tiles)
    return model


@pytest.fixture(scope="session")
def resnet_cfg() -> ModelConfig:
    return ModelConfig(encoder_name="resnet18", encoder_width=0.25, output_stride=8, input_mpp=0.5)


@pytest.fixture(scope="session")
def resnet_model(resnet_cfg: ModelConfig, tissue_tiles: np.ndarray) -> PixelCAM:
    return small_model(resnet_cfg, tissue_tiles)


@pytest.fixture(scope="session")
def resnet_onnx(tmp_path_factory: pytest.TempPathFactory, resnet_model: PixelCAM, resnet_cfg: ModelConfig) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "resnet18.onnx"
    return export_onnx(resnet_model, resnet_cfg, path, fg_threshold=0.4,
                       provenance={"dataset": "glas-test", "metrics": {"pxap": 12.5}})


@pytest.fixture(scope="session")
def resnet_onnx_v1(tmp_path_factory: pytest.TempPathFactory, resnet_model: PixelCAM, resnet_cfg: ModelConfig) -> Path:
    """The same model as a format_version 1 artefact (fixed 224 px tiles, no class_logits)."""
    path = tmp_path_factory.mktemp("onnx_v1") / "resnet18-v1.onnx"
    return export_onnx(resnet_model, resnet_cfg, path, fg_threshold=0.4, dense=False,
                       provenance={"dataset": "glas-test", "metrics": {"pxap": 12.5}})
