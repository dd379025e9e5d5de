"""One slide interface over OpenSlide and tiffslide: `open_slide` returns a `Slide` with a backend-free `SlideInfo`.

Coordinates are level-0 pixels of the backend (`l0_`) or pixels of one pyramid level (`lvl_`); sizes are
(width, height), arrays (H, W, 3) uint8 RGB composited on white. OpenSlide is tried first (vendor formats, DICOM,
MRXS); tiffslide reads the TIFF family where OpenSlide refuses or sees fewer levels (SubIFD pyramids), and fsspec
URLs. Untiled (striped) TIFFs are accepted up to `MAX_UNTILED_PX` pixels and refused above it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import openslide
import tifffile
import tiffslide

from service.slide.errors import MissingMppError, SlideError, SlideNotFoundError, UnsupportedSlideError
from service.slide.metadata import (
    check_tiff_complete,
    diagnose_dicom,
    objective_power,
    resolve_mpp,
    sniff,
    truncated_header_error,
    unknown_format_error,
)

__all__ = ["MAX_UNTILED_PX", "MissingMppError", "Slide", "SlideError", "SlideInfo", "SlideNotFoundError",
           "UnsupportedSlideError", "open_slide"]

logger = logging.getLogger(__name__)

MAX_UNTILED_PX = 64_000_000  # a striped TIFF above this (about 190 MB of RGB) is refused as "not tiled"
BAND_BYTES = 32 << 20  # memory budget of one band when reading a downscaled whole-slide image


@dataclass(frozen=True)
class SlideInfo:
    """Backend-free description of an opened slide (level-0 pixels, microns per pixel with provenance)."""

    name: str
    format: str
    vendor: str
    backend: str
    l0_size_wh: tuple[int, int]
    level_sizes_wh: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_x: float
    mpp_y: float
    mpp_source: str
    objective_power: float | None
    bounds: tuple[int, int, int, int] | None
    quickhash: str

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_downsamples)

    @property
    def mpp(self) -> float:
        """Mean microns per level-0 pixel."""
        return (self.mpp_x + self.mpp_y) / 2

    def best_level_for_downsample(self, downsample: float) -> int:
        """Deepest level whose downsample does not exceed `downsample` (0.1 % tolerance): never upsample."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.001:
                best = level
        return best

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        out = asdict(self)
        out["l0_size_wh"] = list(self.l0_size_wh)
        out["level_sizes_wh"] = [list(s) for s in self.level_sizes_wh]
        out["level_downsamples"] = list(self.level_downsamples)
        out["bounds"] = list(self.bounds) if self.bounds else None
        return out


class Slide:
    """An open slide; use as a context manager. Not shared across threads: open one per thread."""

    def __init__(self, path: str | Path, backend: Any, backend_name: str, info: SlideInfo,
                 properties: dict[str, Any]) -> None:
        self.path = path
        self.info = info
        self.properties = properties
        self._backend = backend
        self._backend_name = backend_name

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the backend handle."""
        self._backend.close()

    def best_level_for_downsample(self, downsample: float) -> int:
        """Deepest level whose downsample does not exceed `downsample`."""
        return self.info.best_level_for_downsample(downsample)

    def read_region(self, l0_xy: tuple[int, int], level: int, lvl_size_wh: tuple[int, int]) -> np.ndarray:
        """Read (H, W, 3) uint8 RGB at `level`, top-left at level-0 `l0_xy`; white outside the slide."""
        if not 0 <= level < self.info.level_count:
            raise SlideError(f"level {level} does not exist in {self.info.name!r} "
                             f"(it has {self.info.level_count}); pick 0..{self.info.level_count - 1}")
        lvl_w, lvl_h = int(lvl_size_wh[0]), int(lvl_size_wh[1])
        if lvl_w <= 0 or lvl_h <= 0:
            raise SlideError(f"read size must be positive, got {lvl_size_wh}")
        l0_x, l0_y = int(l0_xy[0]), int(l0_xy[1])
        try:
            if self._backend_name == "openslide":
                rgba = np.asarray(self._backend.read_region((l0_x, l0_y), level, (lvl_w, lvl_h)))
                return _composite_on_white(rgba)
            return self._read_tiffslide(l0_x, l0_y, level, lvl_w, lvl_h)
        except Exception as err:  # backends raise OpenSlideError, tifffile and codec errors on damaged data
            raise SlideError(f"reading {lvl_w} x {lvl_h} px at level {level}, level-0 ({l0_x}, {l0_y}) of "
                             f"{self.info.name!r} failed ({err}); the file may be damaged") from err

    def _read_tiffslide(self, l0_x: int, l0_y: int, level: int, lvl_w: int, lvl_h: int) -> np.ndarray:
        """tiffslide read clipped to the level, padded with white (tiffslide pads with black)."""
        ds = self.info.level_downsamples[level]
        full_w, full_h = self.info.level_sizes_wh[level]
        lvl_x, lvl_y = int(round(l0_x / ds)), int(round(l0_y / ds))  # as the tile reader does
        out = np.full((lvl_h, lvl_w, 3), 255, np.uint8)
        x0, y0 = max(lvl_x, 0), max(lvl_y, 0)
        x1, y1 = min(lvl_x + lvl_w, full_w), min(lvl_y + lvl_h, full_h)
        if x1 <= x0 or y1 <= y0:
            return out
        l0_clip = (int(round(x0 * ds)), int(round(y0 * ds)))
        arr = np.asarray(self._backend.read_region(l0_clip, level, (x1 - x0, y1 - y0), as_array=True))
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = _composite_on_white(arr)
        out[y0 - lvl_y:y1 - lvl_y, x0 - lvl_x:x1 - lvl_x] = arr[: y1 - y0, : x1 - x0, :3]
        return out

    def thumbnail(self, max_size_wh: tuple[int, int], *, max_upscale: float = 1.0) -> np.ndarray:
        """Whole slide downscaled to fit `max_size_wh`, keeping the aspect ratio, in bounded memory.

        `max_upscale` > 1 lets a smaller pyramid level be enlarged by up to that factor instead of reading and
        shrinking a much larger one (a 1000-px level for a 1024-px thumbnail instead of a 4000-px one).
        """
        l0_w, l0_h = self.info.l0_size_wh
        scale = min(max_size_wh[0] / l0_w, max_size_wh[1] / l0_h, 1.0)
        out_wh = (max(1, round(l0_w * scale)), max(1, round(l0_h * scale)))
        return self.read_scaled(out_wh, max_upscale=max_upscale)

    def read_scaled(self, out_wh: tuple[int, int], l0_region_wh: tuple[float, float] | None = None, *,
                    max_upscale: float = 1.0) -> np.ndarray:
        """Level-0 region (0, 0, `l0_region_wh`) (default: the slide) resized to `out_wh`, read in bands.

        The level read is the deepest one that needs at most `max_upscale` enlargement (1.0: none).
        """
        out_w, out_h = int(out_wh[0]), int(out_wh[1])
        l0_w, l0_h = l0_region_wh or self.info.l0_size_wh
        level = self.best_level_for_downsample(min(l0_w / out_w, l0_h / out_h) * max(1.0, float(max_upscale)))
        ds = self.info.level_downsamples[level]
        lvl_w = max(1, int(round(l0_w / ds)))
        rows_per_out = l0_h / ds / out_h
        out_rows_per_band = max(1, int(BAND_BYTES // max(1.0, lvl_w * 3 * rows_per_out)))
        out = np.empty((out_h, out_w, 3), np.uint8)
        for r0 in range(0, out_h, out_rows_per_band):
            r1 = min(out_h, r0 + out_rows_per_band)
            y0 = int(round(r0 * rows_per_out))
            y1 = max(int(round(r1 * rows_per_out)), y0 + 1)
            band = self.read_region((0, int(round(y0 * ds))), level, (lvl_w, y1 - y0))
            interp = cv2.INTER_AREA if band.shape[1] >= out_w else cv2.INTER_LINEAR
            out[r0:r1] = cv2.resize(band, (out_w, r1 - r0), interpolation=interp)
        return out


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Straight-alpha RGBA onto white; OpenSlide marks outside-the-scan pixels as transparent."""
    rgb = np.array(rgba[..., :3], dtype=np.uint8, order="C")
    if rgba.shape[2] == 3:
        return rgb
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return rgb
    rgb[alpha == 0] = 255
    partial = (alpha > 0) & (alpha < 255)
    if partial.any():
        a = alpha[partial].astype(np.uint16)[:, None]
        rgb[partial] = ((rgb[partial].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    return rgb


def _resolve_local(path: Path) -> Path:
    """A folder (DICOM series) resolves to one of its .dcm files; a missing path is an error."""
    if path.is_dir():
        dcm = sorted(path.glob("*.dcm"))
        if not dcm:
            raise UnsupportedSlideError(f"{path.name!r} is a folder without .dcm files; pass a slide file or a "
                                        f"folder holding one DICOM WSI series", code="not-a-slide")
        return dcm[0]
    if not path.is_file():
        raise SlideNotFoundError(f"slide {str(path)!r} does not exist or is not a file; check the path")
    return path


def _open_openslide(path: Path) -> tuple[Any, str | None]:
    """OpenSlide handle, or None and OpenSlide's error text."""
    try:
        return openslide.OpenSlide(str(path)), None
    except openslide.OpenSlideError as err:  # includes OpenSlideUnsupportedFormatError
        return None, (str(err) or type(err).__name__).replace(str(path), path.name)


def _check_tiff_pixels(path: Path, tif: Any) -> None:
    """Refuse TIFFs that are not brightfield RGB, or untiled and too large to read whole."""
    series = tif.series[0]
    page = series.levels[0].keyframe
    axes = series.axes
    description = str(page.description or "")
    if "PerkinElmer-QPI" in description or ("C" in axes and "S" not in axes):
        kind = "PerkinElmer/Akoya QPTIFF" if "PerkinElmer-QPI" in description else "multi-channel TIFF"
        n_ch = series.shape[axes.index("C")] if "C" in axes else page.samplesperpixel
        raise UnsupportedSlideError(
            f"{path.name!r} is a fluorescence/multiplex image ({kind}, {n_ch} single-channel planes), not a "
            f"brightfield RGB slide; the model was trained on H&E brightfield scans", code="fluorescence")
    if page.samplesperpixel < 3 or page.bitspersample != 8:
        raise UnsupportedSlideError(
            f"{path.name!r} has {page.samplesperpixel} sample(s) of {page.bitspersample} bits per pixel; only "
            f"8-bit RGB brightfield slides can be analysed", code="not-brightfield")
    if not page.is_tiled:
        n_px = int(page.imagewidth) * int(page.imagelength)
        if n_px > MAX_UNTILED_PX:
            raise UnsupportedSlideError(
                f"{path.name!r} is not tiled: a striped TIFF of {page.imagewidth} x {page.imagelength} px "
                f"({n_px / 1e6:.0f} Mpx) above the {MAX_UNTILED_PX / 1e6:.0f} Mpx cap for untiled images cannot "
                f"be read region by region; convert it with `vips tiffsave in.tif out.tif --tile --pyramid "
                f"--compression jpeg`", code="not-tiled")


def _inspect_tiff(path: Path, check_pixels: bool) -> tuple[int, dict[str, Any]]:
    """Validate a TIFF's structure (and pixels); return tifffile's level count and level-0 resolution tags."""
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise UnsupportedSlideError(f"{path.name!r} is a TIFF without images", code="not-a-slide")
            check_tiff_complete(path, tif)
            if check_pixels:
                _check_tiff_pixels(path, tif)
            return len(tif.series[0].levels), _resolution_tags(tif.series[0].levels[0].keyframe)
    except (tifffile.TiffFileError, ValueError, IndexError, KeyError, OSError) as err:
        raise UnsupportedSlideError(f"{path.name!r} is a damaged TIFF ({err}); copy or upload the complete "
                                    f"file again", code="corrupt") from err


def _resolution_tags(page: Any) -> dict[str, Any]:
    """Resolution tags as tifffile reads them (OpenSlide reports millimetre units as 'unknown')."""
    tags = page.tags
    if "XResolution" not in tags:
        return {}
    xres, yres = tags["XResolution"].value, tags.get("YResolution", tags["XResolution"]).value
    unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2

    def ratio(value: Any) -> float:
        return value[0] / value[1] if isinstance(value, tuple) and value[1] else float(value)

    return {"tiff.XResolution": ratio(xres), "tiff.YResolution": ratio(yres),
            "tiff.ResolutionUnit": {1: "none", 2: "inch", 3: "centimeter", 4: "millimeter",
                                    5: "micrometer"}.get(int(unit), "none")}


def _check_dicom_brightfield(path: Path, props: dict[str, Any]) -> None:
    """Refuse a DICOM WSI whose optical path says fluorescence."""
    illum = str(props.get("dicom.OpticalPathSequence[0].IlluminationTypeCodeSequence[0].CodeMeaning", ""))
    if illum and "brightfield" not in illum.lower():
        raise UnsupportedSlideError(f"{path.name!r} was acquired with {illum!r}, not brightfield "
                                    f"illumination; the model needs brightfield RGB", code="fluorescence")


def _quickhash(path: Path, props: dict[str, Any]) -> str:
    """OpenSlide's quickhash-1 when present, else sha256 of the size and the first and last MiB."""
    qh = props.get("openslide.quickhash-1")
    if qh:
        return str(qh)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        digest.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        digest.update(fh.read(1 << 20))
    return digest.hexdigest()


def _bounds(props: dict[str, Any]) -> tuple[int, int, int, int] | None:
    """Non-empty region (x, y, w, h) in level-0 pixels when the format declares one (MRXS)."""
    keys = [f"openslide.bounds-{k}" for k in ("x", "y", "width", "height")]
    values = [str(props.get(k) or "") for k in keys]
    if not all(values):
        return None
    x, y, w, h = (int(float(v)) for v in values)
    return x, y, w, h


def _build_info(name: str, path: Path, fmt: str, backend: Any, backend_name: str, props: dict[str, Any],
                mpp_override: float | None) -> SlideInfo:
    """Assemble SlideInfo from a backend handle and its properties."""
    mpp_x, mpp_y, source = resolve_mpp(props, mpp_override, name)
    vendor = props.get("openslide.vendor") or props.get("tiffslide.vendor") or "generic-tiff"
    return SlideInfo(
        name=name, format=fmt, vendor=str(vendor), backend=backend_name,
        l0_size_wh=(int(backend.dimensions[0]), int(backend.dimensions[1])),
        level_sizes_wh=tuple((int(w), int(h)) for w, h in backend.level_dimensions),
        level_downsamples=tuple(float(d) for d in backend.level_downsamples),
        mpp_x=float(mpp_x), mpp_y=float(mpp_y), mpp_source=source, objective_power=objective_power(props),
        bounds=_bounds(props), quickhash=_quickhash(path, props) if path.is_file() else "",
    )


def _open_remote(url: str, mpp_override: float | None) -> Slide:
    """fsspec URL through tiffslide (TIFF family only)."""
    try:
        backend = tiffslide.TiffSlide(url)
    except Exception as err:  # fsspec and tifffile raise many types for unreachable or non-TIFF objects
        raise UnsupportedSlideError(f"could not open {url!r} through tiffslide ({err}); remote slides must be "
                                    f"TIFF-family (SVS, generic TIFF) and reachable", code="not-a-slide") from err
    props = dict(backend.properties)
    name = url.rstrip("/").rsplit("/", 1)[-1]
    mpp_x, mpp_y, source = resolve_mpp(props, mpp_override, name)
    info = SlideInfo(name=name, format="tiff", vendor=str(props.get("tiffslide.vendor") or "generic-tiff"),
                     backend="tiffslide", l0_size_wh=tuple(backend.dimensions),  # type: ignore[arg-type]
                     level_sizes_wh=tuple(tuple(d) for d in backend.level_dimensions),  # type: ignore[misc]
                     level_downsamples=tuple(float(d) for d in backend.level_downsamples), mpp_x=mpp_x,
                     mpp_y=mpp_y, mpp_source=source, objective_power=objective_power(props), bounds=None,
                     quickhash="")
    return Slide(url, backend, "tiffslide", info, props)


def _open_tiff_family(target: Path, head: bytes) -> tuple[Any, str, dict[str, Any]]:
    """OpenSlide for vendor TIFFs; tiffslide where OpenSlide refuses or misses SubIFD levels (generic TIFF)."""
    err = truncated_header_error(target, head)
    if err:
        raise err
    backend, os_error = _open_openslide(target)
    generic = backend is None or backend.properties.get("openslide.vendor") == "generic-tiff"
    try:
        tiff_levels, tiff_props = _inspect_tiff(target, check_pixels=generic)
    except UnsupportedSlideError as err:
        if backend is None or err.code != "corrupt":
            if backend is not None:
                backend.close()
            raise
        logger.warning("tifffile cannot parse %s (%s); relying on OpenSlide", target.name, err)
        return backend, "openslide", {}
    if backend is not None and generic and backend.level_count < tiff_levels:
        logger.info("%s: tiffslide sees %d levels, OpenSlide %d; using tiffslide", target.name, tiff_levels,
                    backend.level_count)
        backend.close()
        backend = None
    if backend is not None:
        return backend, "openslide", tiff_props if generic else {}
    try:
        return tiffslide.TiffSlide(target), "tiffslide", tiff_props
    except Exception as err:  # tifffile raises many types on damaged files
        raise unknown_format_error(target, f"OpenSlide: {os_error}; tiffslide: {err}") from err


def _format_name(target: Path, kind: str) -> str:
    """Container format: 'dicom', or the file extension ('svs', 'tiff', 'ndpi', 'mrxs', ...)."""
    if kind == "dicom":
        return "dicom"
    suffix = target.suffix.lower().lstrip(".")
    return {"tif": "tiff", "": kind}.get(suffix, suffix)


def open_slide(path: str | Path, mpp_override: float | None = None) -> Slide:
    """Open a slide file (or a DICOM series folder, or an fsspec URL); refuse with a specific reason."""
    if isinstance(path, str) and "://" in path:
        return _open_remote(path, mpp_override)
    target = _resolve_local(Path(path))
    kind, head = sniff(target)
    tiff_props: dict[str, Any] = {}
    if kind == "tiff":
        backend, backend_name, tiff_props = _open_tiff_family(target, head)
    else:
        backend, os_error = _open_openslide(target)
        backend_name = "openslide"
        if backend is None:
            if kind == "dicom":
                raise diagnose_dicom(target, os_error or "")
            raise unknown_format_error(target, f"OpenSlide: {os_error}")
    try:
        props = {str(k): v for k, v in backend.properties.items()} | tiff_props
        if kind == "dicom":
            _check_dicom_brightfield(target, props)
        info = _build_info(target.name, target, _format_name(target, kind), backend, backend_name, props,
                           mpp_override)
    except SlideError:
        backend.close()
        raise
    logger.debug("opened %s with %s: %s", target.name, backend_name, info)
    return Slide(target, backend, backend_name, info, props)
