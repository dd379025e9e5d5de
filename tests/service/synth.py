"""Synthetic slides for the slide, tiling and reader tests, written with tifffile into tmp folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


def tissue_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: white background with one textured pink-purple ellipse of 'tissue' in the middle."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 242, np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    inside = ((xx - width / 2) / (width * 0.3)) ** 2 + ((yy - height / 2) / (height * 0.3)) ** 2 <= 1.0
    noise = rng.integers(-25, 25, size=(height, width, 1))
    tissue = np.clip(np.array([200, 110, 170])[None, None, :] + noise, 0, 255).astype(np.uint8)
    img[inside] = tissue[inside]
    return img


def write_pyramid(path: Path, image: np.ndarray, *, levels: int = 3, tile: int = 128, mpp: float | None = 0.5,
                  unit: str = "CENTIMETER", compression: str = "jpeg", subifds: bool = False) -> Path:
    """Tiled pyramidal TIFF (each level half the previous), with resolution tags unless `mpp` is None."""
    per_unit = {"CENTIMETER": 1e4, "INCH": 25400.0, "MILLIMETER": 1e3}[unit]
    res: dict[str, object] = {}
    if mpp is not None:
        res = {"resolution": (per_unit / mpp, per_unit / mpp), "resolutionunit": unit}
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, tile=(tile, tile), compression=compression, photometric="rgb",
                 subifds=levels - 1 if subifds else None, **res)
        for lvl in range(1, levels):
            tw.write(image[:: 2**lvl, :: 2**lvl], tile=(tile, tile), compression=compression,
                     photometric="rgb", subfiletype=1)
    return path
