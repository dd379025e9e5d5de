"""Generate large, realistic pyramidal slides mosaicked from the real tissue in the shared data.

Usage: ``python bench/make_slide.py OUT.svs --width 40000 --height 30000 [--tissue-fraction 0.25]``

The slide is written tile by tile (memory does not grow with its size) as JPEG tiles in YCbCr 4:2:0, like
scanners write them: either SVS-like (Aperio ImageDescription with ``AppMag``/``MPP``, pyramid downsample 4,
thumbnail page) or a generic tiled TIFF with resolution tags (pyramid downsample 2). Tissue is drawn in
blob-shaped regions from a smooth random field thresholded to the requested area fraction; inside the regions,
cells of real H&E (GlaS images, CMU-1-Small-Region) resampled to the target MPP are laid out in random orders
and orientations; outside, a white-ish background with light noise, so tissue detection behaves as on scans.

Planes: ``l0_`` level-0 pixels of the generated slide, ``lvl_`` pixels of one of its levels.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
GLAS_MPP = 0.620  # GlaS: Zeiss MIRAX MIDI at 20x, 0.620 um/px (Sirinukunwattana et al. 2017)
CELL_L0_PX = 512  # side of one mosaic cell at level 0
BACKGROUND_RGB = (238, 236, 241)
NOISE_STD = 2.5
BLOB_UM = 2500.0  # typical size of one tissue region (a few millimetres, like sections on a slide)


class SlideGenerationError(RuntimeError):
    """The slide could not be generated (missing data or impossible parameters)."""


def shared_data_dir() -> Path:
    """``PIXELCAM_DATA_DIR``, else the ``shared/data`` folder beside the repository."""
    env = os.environ.get("PIXELCAM_DATA_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def _source_images(data_dir: Path) -> list[tuple[Path, float]]:
    """Real H&E images with their MPP: every GlaS image and CMU-1-Small-Region."""
    glas = sorted((data_dir / "glas" / "images").glob("*.png"))
    sources = [(p, GLAS_MPP) for p in glas]
    cmu = data_dir / "slides" / "CMU-1-Small-Region.svs"
    if cmu.is_file():
        sources.append((cmu, 0.499))
    if not sources:
        raise SlideGenerationError(
            f"no source tissue under {data_dir} (expected glas/images/*.png); set PIXELCAM_DATA_DIR"
        )
    return sources


def _read_rgb(path: Path) -> np.ndarray:
    """Decode one source image to (H, W, 3) uint8 RGB."""
    if path.suffix == ".svs":
        return np.asarray(tifffile.imread(path, key=0))[..., :3]
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SlideGenerationError(f"cannot decode {path}; check the shared data against its MANIFEST.md")
    return bgr[..., ::-1]


def _tissue_share(rgb: np.ndarray) -> float:
    """Fraction of pixels that look like stained tissue (HSV saturation above a low threshold)."""
    sat = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 1]
    return float((sat > 20).mean())


def build_atlas(data_dir: Path, mpp: float, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    """Square crops of real tissue at ``mpp``: (N, CELL_L0_PX, CELL_L0_PX, 3) uint8."""
    sources = _source_images(data_dir)
    order = rng.permutation(len(sources))
    cells: list[np.ndarray] = []
    side = CELL_L0_PX
    for i in order:
        path, src_mpp = sources[i]
        rgb = _read_rgb(path)
        scale = src_mpp / mpp
        size_wh = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        rgb = cv2.resize(rgb, size_wh, interpolation=interp)
        n_y, n_x = rgb.shape[0] // side, rgb.shape[1] // side
        if n_x == 0 or n_y == 0:
            continue
        spots = [(y, x) for y in range(n_y) for x in range(n_x)]
        rng.shuffle(spots)
        per_image = 1 if len(sources) > max_cells else 4
        for y, x in spots[:per_image]:
            crop = rgb[y * side : (y + 1) * side, x * side : (x + 1) * side]
            if _tissue_share(crop) >= 0.5:
                cells.append(np.ascontiguousarray(crop))
        if len(cells) >= max_cells:
            break
    if not cells:
        raise SlideGenerationError(f"no usable tissue crop of {side} px at {mpp} um/px in {data_dir}")
    return np.stack(cells[:max_cells])


@dataclass(frozen=True)
class SlideSpec:
    """What to generate."""

    l0_size_wh: tuple[int, int]
    tissue_fraction: float
    mpp: float
    tile: int
    quality: int
    fmt: str
    seed: int

    @property
    def level_factor(self) -> int:
        """Downsample between consecutive levels: 4 like Aperio, 2 for generic TIFF."""
        return 4 if self.fmt == "svs" else 2

    def level_downsamples(self) -> list[int]:
        """Integer downsamples of the pyramid, down to a level whose long side is under ~1000 px."""
        downs = [1]
        while max(self.l0_size_wh) // (downs[-1] * self.level_factor) >= 1000:
            downs.append(downs[-1] * self.level_factor)
        return downs

    def level_size_wh(self, downsample: int) -> tuple[int, int]:
        """Level size in pixels (floor division, as scanners do)."""
        return max(1, self.l0_size_wh[0] // downsample), max(1, self.l0_size_wh[1] // downsample)


class SlideRenderer:
    """Renders any region of the synthetic slide at any integer downsample, deterministically."""

    def __init__(self, spec: SlideSpec, atlas: np.ndarray) -> None:
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 1])
        l0_w, l0_h = spec.l0_size_wh
        self._n_cells_xy = (-(-l0_w // CELL_L0_PX), -(-l0_h // CELL_L0_PX))
        self._cell_atlas = rng.integers(0, len(atlas), size=self._n_cells_xy[::-1])
        self._cell_orient = rng.integers(0, 8, size=self._n_cells_xy[::-1])
        self._atlas_l0 = atlas
        self._atlas_by_down: dict[int, np.ndarray] = {}
        # Field resolution: never more than 2048 cells a side, so memory is bounded for any slide size.
        self._field_l0_per_px = max(16.0, max(spec.l0_size_wh) / 2048)
        self._field, self._threshold = self._tissue_field(rng)
        self._noise = rng.normal(0.0, NOISE_STD, size=(16, spec.tile, spec.tile, 3)).astype(np.float32)
        self._background = np.asarray(BACKGROUND_RGB, np.float32) + rng.normal(0, 2, 3).astype(np.float32)

    def _tissue_field(self, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """A smooth random field and the threshold above which it is tissue."""
        spec = self.spec
        f_w = max(8, round(spec.l0_size_wh[0] / self._field_l0_per_px))
        f_h = max(8, round(spec.l0_size_wh[1] / self._field_l0_per_px))
        field = np.zeros((f_h, f_w), np.float32)
        blob_px = BLOB_UM / spec.mpp / self._field_l0_per_px
        for octave, weight in ((1.0, 1.0), (3.0, 0.35), (9.0, 0.12)):
            step = max(2.0, blob_px / octave)
            coarse = rng.normal(size=(int(f_h / step) + 3, int(f_w / step) + 3)).astype(np.float32)
            up_wh = (int(coarse.shape[1] * step), int(coarse.shape[0] * step))
            up = cv2.resize(coarse, up_wh, interpolation=cv2.INTER_CUBIC)
            field += weight * up[:f_h, :f_w]
        # Keep tissue off the slide's edges, as on a glass slide.
        margin = max(2, int(0.05 * min(f_w, f_h)))
        ramp_x = np.clip(np.minimum(np.arange(f_w), f_w - 1 - np.arange(f_w)) / margin, 0, 1)
        ramp_y = np.clip(np.minimum(np.arange(f_h), f_h - 1 - np.arange(f_h)) / margin, 0, 1)
        field -= 10.0 * (1.0 - np.minimum.outer(ramp_y, ramp_x)).astype(np.float32)
        threshold = float(np.quantile(field, 1.0 - spec.tissue_fraction))
        return field, threshold

    def _atlas(self, downsample: int) -> np.ndarray:
        """The atlas resized for one downsample (cached)."""
        if downsample not in self._atlas_by_down:
            side = max(1, round(CELL_L0_PX / downsample))
            resized = [cv2.resize(c, (side, side), interpolation=cv2.INTER_AREA) for c in self._atlas_l0]
            self._atlas_by_down[downsample] = np.stack(resized).reshape(len(resized), side, side, 3)
        return self._atlas_by_down[downsample]

    def _alpha(self, l0_x: np.ndarray, l0_y: np.ndarray) -> np.ndarray | None:
        """Tissue opacity at pixel centres (H, W) float32, or None where the region is all background."""
        fx = l0_x / self._field_l0_per_px - 0.5
        fy = l0_y / self._field_l0_per_px - 0.5
        x0, x1 = max(0, int(fx[0]) - 1), int(fx[-1]) + 2
        y0, y1 = max(0, int(fy[0]) - 1), int(fy[-1]) + 2
        if self._field[y0:y1, x0:x1].max(initial=-np.inf) < self._threshold:
            return None
        map_x = np.broadcast_to(fx[None, :], (len(fy), len(fx))).astype(np.float32)
        map_y = np.broadcast_to(fy[:, None], (len(fy), len(fx))).astype(np.float32)
        f = cv2.remap(self._field, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return np.clip((f - self._threshold) * 40.0 + 0.5, 0.0, 1.0)

    def _tissue(self, downsample: int, l0_x: np.ndarray, l0_y: np.ndarray) -> np.ndarray:
        """Mosaic of real tissue at the pixel centres: (H, W, 3) float32."""
        atlas = self._atlas(downsample)
        side = atlas.shape[1]
        cx = np.minimum(l0_x // CELL_L0_PX, self._n_cells_xy[0] - 1).astype(np.int64)
        cy = np.minimum(l0_y // CELL_L0_PX, self._n_cells_xy[1] - 1).astype(np.int64)
        u = np.minimum((l0_x % CELL_L0_PX) * side / CELL_L0_PX, side - 1).astype(np.int64)
        v = np.minimum((l0_y % CELL_L0_PX) * side / CELL_L0_PX, side - 1).astype(np.int64)
        idx = self._cell_atlas[cy[:, None], cx[None, :]]
        orient = self._cell_orient[cy[:, None], cx[None, :]]
        uu = np.broadcast_to(u[None, :], idx.shape)
        vv = np.broadcast_to(v[:, None], idx.shape)
        uu = np.where(orient & 1, side - 1 - uu, uu)
        vv = np.where(orient & 2, side - 1 - vv, vv)
        uu, vv = np.where(orient & 4, vv, uu), np.where(orient & 4, uu, vv)
        return atlas[idx, vv, uu].astype(np.float32)

    def render(self, downsample: int, lvl_xy: tuple[int, int], lvl_size_wh: tuple[int, int]) -> np.ndarray:
        """Pixels of one region of the level at ``downsample``: (H, W, 3) uint8 RGB."""
        (x, y), (w, h) = lvl_xy, lvl_size_wh
        l0_x = (x + np.arange(w) + 0.5) * downsample
        l0_y = (y + np.arange(h) + 0.5) * downsample
        noise_id = (x * 7 + y * 13 + downsample) % len(self._noise)
        noise = self._noise[noise_id]
        if noise.shape[:2] != (h, w):
            noise = np.resize(noise, (h, w, 3))
        background = self._background + noise
        alpha = self._alpha(l0_x, l0_y)
        if alpha is None:
            out = background
        else:
            tissue = self._tissue(downsample, np.floor(l0_x), np.floor(l0_y))
            out = background + alpha[..., None] * (tissue - background)
        return np.clip(out, 0, 255).astype(np.uint8)

    def tiles(self, downsample: int) -> Iterator[np.ndarray]:
        """The tiles of one level in TIFF order (row-major), each (tile, tile, 3) uint8."""
        lvl_w, lvl_h = self.spec.level_size_wh(downsample)
        t = self.spec.tile
        for ty in range(-(-lvl_h // t)):
            for tx in range(-(-lvl_w // t)):
                yield self.render(downsample, (tx * t, ty * t), (t, t))


def _aperio_description(spec: SlideSpec, lvl_size_wh: tuple[int, int], kind: str) -> str:
    """An Aperio-style ImageDescription: OpenSlide and tiffslide read vendor, AppMag and MPP from it."""
    l0_w, l0_h = spec.l0_size_wh
    head = f"Aperio Image Library v12.0.15 \r\n{l0_w}x{l0_h} [0,0 {l0_w}x{l0_h}]"
    if kind == "level0":
        head += f" ({spec.tile}x{spec.tile}) JPEG/RGB Q={spec.quality}"
    else:
        head += f" -> {lvl_size_wh[0]}x{lvl_size_wh[1]} JPEG/RGB Q={spec.quality}"
    app_mag = max(1, round(10.0 / spec.mpp))
    fields = [f"AppMag = {app_mag}", f"MPP = {spec.mpp:.4f}", "ScannerType = pixelcam-bench-synthetic"]
    return head + "|" + "|".join(fields)


def write_slide(out: Path, spec: SlideSpec, data_dir: Path | None = None, max_cells: int = 64) -> Path:
    """Write the slide described by ``spec`` to ``out`` and return the path."""
    if not 0.0 < spec.tissue_fraction <= 0.9:
        raise SlideGenerationError(f"--tissue-fraction must be in (0, 0.9], got {spec.tissue_fraction}")
    if spec.tile % 16 or spec.tile <= 0:
        raise SlideGenerationError(f"--tile must be a positive multiple of 16 (JPEG MCU), got {spec.tile}")
    if min(spec.l0_size_wh) < spec.tile:
        raise SlideGenerationError(f"slide {spec.l0_size_wh} is smaller than one tile of {spec.tile} px")
    rng = np.random.default_rng([spec.seed, 0])
    atlas = build_atlas(data_dir or shared_data_dir(), spec.mpp, max_cells, rng)
    renderer = SlideRenderer(spec, atlas)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    common = {
        "dtype": np.uint8,
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": spec.quality},
        "subsampling": (2, 2),
        "metadata": None,
        "software": "pixelcam bench/make_slide.py",
    }
    res = {"resolution": (1e4 / spec.mpp, 1e4 / spec.mpp), "resolutionunit": "CENTIMETER"}
    started = time.perf_counter()
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for i, down in enumerate(spec.level_downsamples()):
            lvl_w, lvl_h = spec.level_size_wh(down)
            extra: dict[str, object] = dict(res) if i == 0 else {}
            if spec.fmt == "tiff" and i > 0:
                extra["subfiletype"] = 1  # reduced-resolution image: how OpenSlide finds generic-TIFF levels
            if spec.fmt == "svs":
                extra["description"] = _aperio_description(
                    spec, (lvl_w, lvl_h), "level0" if i == 0 else "level"
                )
            tif.write(
                renderer.tiles(down), shape=(lvl_h, lvl_w, 3), tile=(spec.tile, spec.tile), **common, **extra
            )
            logger.info("level %d (downsample %d, %dx%d) written", i, down, lvl_w, lvl_h)
            if i == 0 and spec.fmt == "svs":
                _write_thumbnail(tif, spec, renderer, common)
    tmp.replace(out)
    logger.info("wrote %s in %.1f s", out, time.perf_counter() - started)
    return out


def _write_thumbnail(
    tif: tifffile.TiffWriter, spec: SlideSpec, renderer: SlideRenderer, common: dict
) -> None:
    """The stripped thumbnail page that Aperio puts second (OpenSlide's 'thumbnail' associated image)."""
    down = max(1, -(-max(spec.l0_size_wh) // 1024))
    size_wh = spec.level_size_wh(down)
    pixels = renderer.render(down, (0, 0), size_wh)
    tif.write(pixels, rowsperstrip=16, description=_aperio_description(spec, size_wh, "thumbnail"), **common)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output path (put it under bench/_data/, which git ignores)")
    ap.add_argument("--width", type=int, required=True, help="level-0 width in pixels")
    ap.add_argument("--height", type=int, required=True, help="level-0 height in pixels")
    ap.add_argument(
        "--tissue-fraction", type=float, default=0.25, help="share of the slide area that is tissue"
    )
    ap.add_argument("--format", choices=("svs", "tiff"), default="svs", dest="fmt")
    ap.add_argument("--mpp", type=float, default=0.5, help="level-0 microns per pixel")
    ap.add_argument("--tile", type=int, default=256, help="TIFF tile side in pixels")
    ap.add_argument("--quality", type=int, default=80, help="JPEG quality")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-cells", type=int, default=64, help="distinct real-tissue crops in the mosaic")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    spec = SlideSpec(
        l0_size_wh=(args.width, args.height),
        tissue_fraction=args.tissue_fraction,
        mpp=args.mpp,
        tile=args.tile,
        quality=args.quality,
        fmt=args.fmt,
        seed=args.seed,
    )
    try:
        write_slide(args.out, spec, max_cells=args.max_cells)
    except SlideGenerationError as err:
        logger.error("%s", err)
        return 2
    usage = resource.getrusage(resource.RUSAGE_SELF)  # this process only: the numbers docs/performance.md quotes
    logger.info("peak RSS %.0f MiB (ru_maxrss), %.1f CPU-s", usage.ru_maxrss / 1024,
                usage.ru_utime + usage.ru_stime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
