"""The slide-level answer: class and probability from tile outputs, the evidence behind it, and provenance.

Planes: `hm_` heatmap cells (`l0 = hm * hm_downsample`), `l0_` level-0 pixels, and the tissue mask's own
pixels (`l0 = px * l0_per_px`). Evidence is counted band by band while the heatmap is stitched, so it costs no
extra pass and no extra memory.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.outputs.geojson import Region
from service.outputs.stitching import HeatmapBand, HeatmapGrid, sample_mask

__all__ = [
    "AGGREGATION_WHY",
    "EvidenceCounter",
    "SlideCall",
    "region_summaries",
    "slide_call",
    "software_versions",
    "top_k_for",
    "write_result",
]

logger = logging.getLogger(__name__)

TOP_K_FRACTION = 0.1
TOP_K_MAX = 32
# tiles below this tissue fraction are left out of the top-k when any tile reaches it (0: every analysed tile):
# a tile that is mostly glass carries little evidence, and a model trained on tissue-rich tiles can be confidently
# wrong on it (docs/training.md, "The GlaS mosaics")
TOP_K_MIN_TISSUE = 0.5
AGGREGATION_WHY = (
    "The positive-class probability of the slide is the mean of the top-k tile probabilities "
    f"(k = {TOP_K_FRACTION:.0%} of the tiles, at least 1, at most {TOP_K_MAX}, among the tiles at least "
    f"{TOP_K_MIN_TISSUE:.0%} tissue when there are any). A lesion often occupies a small part of a slide, so a mean "
    "over all tiles dilutes it, while the single highest tile follows one noisy or artefactual tile; a small top-k "
    "mean answers to a focus of several tiles. Tiles that are mostly glass carry too little tissue to count."
)
_PACKAGES = (
    "pixelcam",
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "openslide-python",
    "openslide-bin",
    "tiffslide",
    "tifffile",
    "imagecodecs",
    "opencv-python-headless",
    "shapely",
)


@dataclass(frozen=True)
class SlideCall:
    """The slide's class, its probability, and how it was aggregated from the tiles."""

    label: str
    probability: float
    positive_class: str
    positive_probability: float
    k: int
    tiles: int
    class_means: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """The `classification` block of result.json."""
        return {
            "label": self.label,
            "probability": round(self.probability, 4),
            "positive_class": self.positive_class,
            "positive_probability": round(self.positive_probability, 4),
            "class_means": {k: round(v, 4) for k, v in self.class_means.items()},
            "aggregation": {"method": "top_k_mean", "k": self.k, "tiles": self.tiles, "why": AGGREGATION_WHY},
        }


def top_k_for(n_tiles: int) -> int:
    """How many tiles the top-k mean uses for a slide of `n_tiles` analysed tiles."""
    return max(1, min(TOP_K_MAX, math.ceil(TOP_K_FRACTION * n_tiles)))


def slide_call(
    class_probs: np.ndarray,
    class_names: Sequence[str],
    positive_index: int,
    tissue_fraction: np.ndarray | None = None,
) -> SlideCall:
    """Positive if the top-k mean of the positive-class probability is >= 0.5, else the likeliest other class.

    `class_probs` is (N, C). The other classes are ranked by their tissue-weighted mean probability, and the
    reported probability of a negative call is 1 - the positive probability.
    """
    probs = np.asarray(class_probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] != len(class_names):
        raise ValueError(
            f"class_probs must be (N >= 1, {len(class_names)}), got {probs.shape}; a slide with no analysed "
            "tiles has no class (report it as 'no tissue' instead)"
        )
    weights = np.ones(probs.shape[0]) if tissue_fraction is None else np.asarray(tissue_fraction, np.float64)
    weights = weights if weights.sum() > 0 else np.ones(probs.shape[0])
    means = (probs * weights[:, None]).sum(axis=0) / weights.sum()
    candidates = probs[:, positive_index]
    if TOP_K_MIN_TISSUE > 0 and tissue_fraction is not None:
        rich = np.asarray(tissue_fraction, np.float64) >= TOP_K_MIN_TISSUE
        if rich.any():
            candidates = candidates[rich]
    k = top_k_for(len(candidates))
    positive = float(np.sort(candidates)[-k:].mean())
    if positive >= 0.5:
        label, probability = class_names[positive_index], positive
    else:
        others = [i for i in range(len(class_names)) if i != positive_index]
        label, probability = class_names[max(others, key=lambda i: means[i])], 1.0 - positive
    return SlideCall(
        label=label,
        probability=probability,
        positive_class=class_names[positive_index],
        positive_probability=positive,
        k=k,
        tiles=int(probs.shape[0]),
        class_means={name: float(means[i]) for i, name in enumerate(class_names)},
    )


class EvidenceCounter:
    """Counts analysed, positive and tissue cells band by band (tissue resampled onto the heatmap grid)."""

    def __init__(
        self, grid: HeatmapGrid, threshold: float, tissue_mask: np.ndarray | None, tissue_l0_per_px: float
    ) -> None:
        self.grid = grid
        self.threshold = threshold
        self.tissue_mask = tissue_mask
        self.tissue_l0_per_px = tissue_l0_per_px
        self.analysed = self.positive = self.tissue = self.positive_on_tissue = 0
        self.prob_sum = 0.0

    def _tissue_rows(self, hm_y0: int, shape_hw: tuple[int, int]) -> np.ndarray:
        """The tissue mask sampled at the centres of the band's heatmap cells (nearest pixel)."""
        if self.tissue_mask is None:
            return np.zeros(shape_hw, bool)
        ds = self.grid.hm_downsample
        return sample_mask(self.tissue_mask, self.tissue_l0_per_px, (np.arange(hm_y0, hm_y0 + shape_hw[0]) + 0.5) * ds,
                           (np.arange(shape_hw[1]) + 0.5) * ds)

    def add(self, band: HeatmapBand) -> HeatmapBand:
        """Count one band and hand it on unchanged."""
        positive = band.covered & (band.prob >= self.threshold)
        tissue = self._tissue_rows(band.hm_y0, band.prob.shape)
        self.analysed += int(band.covered.sum())
        self.positive += int(positive.sum())
        self.tissue += int(tissue.sum())
        self.positive_on_tissue += int((positive & tissue).sum())
        self.prob_sum += float(band.prob[band.covered].sum())
        return band

    def to_dict(self, l0_mpp: float) -> dict[str, Any]:
        """Areas in mm² and fractions, as reported in result.json."""
        cell_mm2 = (self.grid.hm_downsample * l0_mpp / 1000.0) ** 2
        tissue_mm2 = 0.0
        if self.tissue_mask is not None:
            tissue_mm2 = float(self.tissue_mask.sum()) * (self.tissue_l0_per_px * l0_mpp / 1000.0) ** 2
        return {
            "threshold": self.threshold,
            "tissue_area_mm2": round(tissue_mm2, 4),
            "analysed_area_mm2": round(self.analysed * cell_mm2, 4),
            "positive_area_mm2": round(self.positive * cell_mm2, 4),
            "positive_fraction_of_tissue": round(self.positive_on_tissue / self.tissue, 4)
            if self.tissue
            else 0.0,
            "positive_fraction_of_analysed": round(self.positive / self.analysed, 4)
            if self.analysed
            else 0.0,
            "mean_probability_analysed": round(self.prob_sum / self.analysed, 4) if self.analysed else 0.0,
        }


def region_summaries(
    regions: Sequence[Region],
    *,
    hm_downsample: float,
    l0_mpp: float,
    l0_offset_xy: tuple[float, float] = (0.0, 0.0),
    top_k: int = 5,
) -> list[dict[str, Any]]:
    """The largest positive regions as level-0 boxes `[x, y, w, h]` (GeoJSON frame) with their probabilities."""
    out = []
    for region in sorted(regions, key=lambda r: -r.cells)[:top_k]:
        x0, y0, x1, y1 = (v * hm_downsample for v in region.hm_bounds)
        out.append(
            {
                "l0_box_xywh": [
                    round(x0 - l0_offset_xy[0], 2),
                    round(y0 - l0_offset_xy[1], 2),
                    round(x1 - x0, 2),
                    round(y1 - y0, 2),
                ],
                "area_um2": round(region.cells * (hm_downsample * l0_mpp) ** 2, 2),
                "mean_probability": round(region.mean_prob, 4),
                "max_probability": round(region.max_prob, 4),
            }
        )
    return out


def software_versions() -> dict[str, str]:
    """Python, the installed versions of the packages that shape a result, and the OpenSlide library."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        import openslide  # may fail to load its C library: the versions are then reported without it

        versions["libopenslide"] = str(openslide.__library_version__)
    except (ImportError, OSError, AttributeError):
        logger.debug("libopenslide version unavailable")
    return versions


def write_result(path: str | os.PathLike[str], result: dict[str, Any]) -> Path:
    """Write result.json atomically (tmp + rename)."""
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out
