"""Slide metadata rules: microns-per-pixel resolution with provenance, and the diagnosis of refused files.

`service.slide.wsi` opens slides with these rules; they read only property dicts and file headers (no pixels). All sizes are
level-0 pixels of the backend (`l0_`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from service.slide.errors import MissingMppError, UnsupportedSlideError

logger = logging.getLogger(__name__)

# the plausible microns per level-0 pixel of a scan, and of an override: the one definition every layer uses
MPP_RANGE: Final = (0.05, 100.0)
# objective power x mpp is about 10 on real scanners (20x ~ 0.5 um/px, 40x ~ 0.25); beyond 4x off it is not a scan.
_POWER_TIMES_MPP_RANGE = (2.5, 40.0)
OVERRIDE_HINT = "pass the scan resolution explicitly: `--mpp X` on the CLI or the `mpp` field in the API request"

_UNIT_UM = {"centimeter": 10000.0, "cm": 10000.0, "inch": 25400.0, "millimeter": 1000.0, "mm": 1000.0,
            "micrometer": 1.0, "um": 1.0, "3": 10000.0, "2": 25400.0, "4": 1000.0, "5": 1.0}


@dataclass(frozen=True)
class MppCandidate:
    """One microns-per-pixel reading and where it came from."""

    source: str
    mpp_x: float
    mpp_y: float
    note: str = ""

    def describe(self) -> str:
        """Human description used in error messages."""
        note = f" ({self.note})" if self.note else ""
        return f"{self.mpp_x:.4g} x {self.mpp_y:.4g} um/px from {self.source}{note}"


def _num(value: Any) -> float | None:
    """Parse a property value as a finite float, else None."""
    if value is None or value == "":
        return None
    try:
        out = float(str(value).strip().strip('"'))
    except ValueError:
        return None
    return out if math.isfinite(out) and out > 0 else None


def _vendor_candidates(props: Mapping[str, Any]) -> list[MppCandidate]:
    """Vendor-specific resolution keys, in the order scanners are common."""
    out: list[MppCandidate] = []
    aperio = _num(props.get("aperio.MPP"))
    if aperio:
        out.append(MppCandidate("aperio.MPP", aperio, aperio))
    prefix = "dicom.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing"
    row_mm, col_mm = _num(props.get(f"{prefix}[0]")), _num(props.get(f"{prefix}[1]"))
    if row_mm and col_mm:  # DICOM PixelSpacing is (row spacing = y, column spacing = x) in mm
        out.append(MppCandidate("dicom.PixelSpacing", col_mm * 1000.0, row_mm * 1000.0))
    philips = str(props.get("philips.DICOM_PIXEL_SPACING", "")).replace('"', " ").split()
    if len(philips) == 2 and _num(philips[0]) and _num(philips[1]):
        out.append(MppCandidate("philips.DICOM_PIXEL_SPACING", float(philips[1]) * 1000.0,
                                float(philips[0]) * 1000.0))
    mx = _num(props.get("mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X"))
    my = _num(props.get("mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_Y"))
    if mx and my:
        out.append(MppCandidate("mirax.MICROMETER_PER_PIXEL", mx, my))
    ventana = _num(props.get("ventana.ScanRes"))
    if ventana:
        out.append(MppCandidate("ventana.ScanRes", ventana, ventana))
    return out


def _tiff_candidate(props: Mapping[str, Any]) -> MppCandidate | None:
    """Microns per pixel from the TIFF resolution tags and their unit (TIFF's default unit is the inch)."""
    xres, yres = _num(props.get("tiff.XResolution")), _num(props.get("tiff.YResolution"))
    if not xres:
        return None
    yres = yres or xres
    unit = str(props.get("tiff.ResolutionUnit", "inch")).strip().lower()
    um_per_unit = _UNIT_UM.get(unit)
    if um_per_unit is None:  # 'none' (1): the tags carry an aspect ratio, not a physical size
        return None
    dpi = xres * 25400.0 / um_per_unit
    note = f"{xres:.4g} px per {unit}, i.e. {dpi:.4g} dpi"
    return MppCandidate("tiff.XResolution", um_per_unit / xres, um_per_unit / yres, note)


def mpp_candidates(props: Mapping[str, Any]) -> list[MppCandidate]:
    """Every MPP reading in the properties, in resolution order (OpenSlide > vendor > TIFF tags > tiffslide)."""
    out: list[MppCandidate] = []
    ox, oy = _num(props.get("openslide.mpp-x")), _num(props.get("openslide.mpp-y"))
    if ox:
        out.append(MppCandidate("openslide.mpp-x", ox, oy or ox))
    out.extend(_vendor_candidates(props))
    tiff = _tiff_candidate(props)
    if tiff:
        out.append(tiff)
    tx, ty = _num(props.get("tiffslide.mpp-x")), _num(props.get("tiffslide.mpp-y"))
    if tx:
        out.append(MppCandidate("tiffslide.mpp-x", tx, ty or tx))
    return out


def objective_power(props: Mapping[str, Any]) -> float | None:
    """Objective magnification from the standard or vendor keys, if any."""
    for key in ("openslide.objective-power", "tiffslide.objective-power", "aperio.AppMag",
                "dicom.OpticalPathSequence[0].ObjectiveLensPower", "hamamatsu.SourceLens"):
        power = _num(props.get(key))
        if power:
            return power
    return None


def _problem(cand: MppCandidate, power: float | None) -> str | None:
    """Why a candidate is implausible, or None when it is usable."""
    lo, hi = MPP_RANGE
    for value in (cand.mpp_x, cand.mpp_y):
        if not lo <= value <= hi:
            return f"outside the plausible range {lo:g}-{hi:g} um/px"
    if power is not None:
        product = power * (cand.mpp_x + cand.mpp_y) / 2
        if not _POWER_TIMES_MPP_RANGE[0] <= product <= _POWER_TIMES_MPP_RANGE[1]:
            return f"inconsistent with objective power {power:g}x (expected about {10 / power:.3g} um/px)"
    return None


def resolve_mpp(props: Mapping[str, Any], mpp_override: float | None, name: str) -> tuple[float, float, str]:
    """Return (mpp_x, mpp_y, source): the override, else the first plausible reading; raise MissingMppError."""
    power = objective_power(props)
    if mpp_override is not None:
        lo, hi = MPP_RANGE
        if not (math.isfinite(mpp_override) and lo <= mpp_override <= hi):
            raise MissingMppError(f"mpp override {mpp_override!r} for {name!r} is outside the plausible range "
                                  f"{lo:g}-{hi:g} um/px (typical: 0.25 at 40x, 0.5 at 20x); {OVERRIDE_HINT}")
        if power is not None and _problem(MppCandidate("override", mpp_override, mpp_override), power):
            logger.warning("mpp override %.4g for %s disagrees with objective power %gx", mpp_override, name,
                           power)
        return float(mpp_override), float(mpp_override), "override"
    found = mpp_candidates(props)
    rejected: list[str] = []
    for cand in found:
        problem = _problem(cand, power)
        if problem is None:
            if abs(cand.mpp_x - cand.mpp_y) > 0.1 * max(cand.mpp_x, cand.mpp_y):
                logger.warning("%s has anisotropic pixels: %s", name, cand.describe())
            return cand.mpp_x, cand.mpp_y, cand.source
        rejected.append(f"{cand.describe()}: {problem}")
    if rejected:
        what = "; ".join(rejected)
        raise MissingMppError(f"no plausible microns-per-pixel for {name!r}: found {what}. The tags are "
                              f"probably a screen resolution, not the scan's; {OVERRIDE_HINT}")
    raise MissingMppError(f"no microns-per-pixel in {name!r}: no OpenSlide, vendor or TIFF resolution keys "
                          f"were found; {OVERRIDE_HINT}")


_PHOTO_MAGIC = {b"\x89PNG\r\n\x1a\n": "a PNG image", b"\xff\xd8\xff": "a JPEG photo", b"GIF8": "a GIF image",
                b"BM": "a BMP image"}
_CONVERT_HINT = ("convert it to a tiled pyramidal TIFF with its resolution, e.g. `vips tiffsave in out.tif --tile "
                 "--pyramid --compression jpeg --xres X --yres X` (X = pixels per mm), or give the original scan")


def sniff(path: Path) -> tuple[str, bytes]:
    """Return ('tiff' | 'dicom' | 'photo' | 'other', header bytes); refuse empty files."""
    size = path.stat().st_size
    if size == 0:
        raise UnsupportedSlideError(f"{path.name!r} is empty (0 bytes): the upload or copy did not complete; "
                                    f"send the file again", code="empty-file")
    with path.open("rb") as fh:
        head = fh.read(132)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff", head
    if head[128:132] == b"DICM":
        return "dicom", head
    for magic, what in _PHOTO_MAGIC.items():
        if head.startswith(magic):
            raise UnsupportedSlideError(f"{path.name!r} is {what}, not a whole-slide image (no pyramid, no "
                                        f"scan resolution); {_CONVERT_HINT}", code="not-a-slide")
    return "other", head


def check_tiff_complete(path: Path, tif: Any) -> None:
    """Refuse a TIFF whose image data lies beyond the end of the file."""
    size = path.stat().st_size
    for page in tif.pages:
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        end = int((offsets + counts)[counts > 0].max(initial=0))
        if end > size:
            raise UnsupportedSlideError(
                f"{path.name!r} is truncated: its image data runs to byte {end:,} but the file has only "
                f"{size:,} bytes; copy or upload the complete file again", code="truncated")


def truncated_header_error(path: Path, head: bytes) -> UnsupportedSlideError | None:
    """Walk a TIFF's directory chain; an error when a directory lies past the end of the file."""
    order: Literal["little", "big"] = "little" if head[:2] == b"II" else "big"
    big = head[2:4] in (b"+\x00", b"\x00+")
    count_len, entry_len, off_len = (8, 20, 8) if big else (2, 12, 4)
    size = path.stat().st_size
    offset = int.from_bytes(head[8:16] if big else head[4:8], order)
    with path.open("rb") as fh:
        for _ in range(100_000):  # bounded: a corrupt chain may loop
            if offset == 0:
                return None
            if offset + count_len > size:
                break
            fh.seek(offset)
            n_entries = int.from_bytes(fh.read(count_len), order)
            next_at = offset + count_len + n_entries * entry_len
            if next_at + off_len > size:
                break
            fh.seek(next_at)
            offset = int.from_bytes(fh.read(off_len), order)
        else:
            return None
    return UnsupportedSlideError(
        f"{path.name!r} is truncated: a TIFF directory at byte {offset:,} lies past the end of the file "
        f"({size:,} bytes); copy or upload the complete file again", code="truncated")


def diagnose_dicom(path: Path, openslide_error: str) -> UnsupportedSlideError:
    """Explain why OpenSlide refused a DICOM file (non-conformant WSI, not a slide, incomplete series)."""
    import pydicom  # 0.23 s to import (measured here); only a DICOM file OpenSlide refused needs it

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about over-long values in non-conformant files
            ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:  # pydicom raises several unrelated types for broken files
        return UnsupportedSlideError(f"{path.name!r} is an unreadable DICOM file ({err}); send an intact "
                                     f"DICOM WSI series", code="corrupt")
    if str(ds.get("SOPClassUID", "")) != "1.2.840.10008.5.1.4.1.1.77.1.6":
        return UnsupportedSlideError(f"{path.name!r} is DICOM but not a VL Whole Slide Microscopy image (SOP "
                                     f"class {ds.get('SOPClassUID', '?')})", code="not-a-slide")
    missing = [label for label, ok in (("ImageType", "ImageType" in ds),
                                       ("pixel spacing (Pixel Measures functional group)",
                                        "SharedFunctionalGroupsSequence" in ds)) if not ok]
    if missing:
        return UnsupportedSlideError(
            f"{path.name!r} is a non-conformant DICOM WSI: it has no {' and no '.join(missing)}, so its level "
            f"and tile layout cannot be trusted (OpenSlide: {openslide_error}); re-export it with a conformant "
            f"converter (e.g. wsidicomizer) or send the original scan", code="non-conformant-dicom")
    return UnsupportedSlideError(
        f"{path.name!r}: OpenSlide could not read this DICOM WSI ({openslide_error}); keep every instance of "
        f"the series in one folder and pass any one of them", code="dicom-unreadable")


def unknown_format_error(path: Path, details: str) -> UnsupportedSlideError:
    """The catch-all refusal for bytes that no backend recognises."""
    return UnsupportedSlideError(f"{path.name!r} is not a recognised slide format ({details}); supported: "
                                 f"Aperio SVS, generic tiled TIFF, DICOM WSI, Hamamatsu, MIRAX, Leica, Philips, "
                                 f"Ventana and other OpenSlide formats", code="not-a-slide")
