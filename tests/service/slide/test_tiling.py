"""Tissue detection on real and synthetic slides; golden tile plans from hand-built geometry."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import service.slide.wsi as slides
from service.slide.tiling import (
    ResolutionTooLowError,
    TilePlan,
    TissueMask,
    detect_tissue,
    plan_tiles,
    tissue_from_rgb,
)
from service.slide.wsi import SlideInfo, open_slide
from tests.service.synth import tissue_image, write_pyramid


def _info(size_wh: tuple[int, int] = (1000, 800), downsamples: tuple[float, ...] = (1.0, 2.0, 4.0),
          mpp: float = 0.5, bounds: tuple[int, int, int, int] | None = None) -> SlideInfo:
    """A hand-built SlideInfo: levels are exact halvings of level 0."""
    sizes = tuple((int(size_wh[0] / d), int(size_wh[1] / d)) for d in downsamples)
    return SlideInfo(name="synthetic", format="tiff", vendor="generic-tiff", backend="none", l0_size_wh=size_wh,
                     level_sizes_wh=sizes, level_downsamples=downsamples, mpp_x=mpp, mpp_y=mpp,
                     mpp_source="override", objective_power=None, bounds=bounds, quickhash="")


def _mask(shape_hw: tuple[int, int], rows: slice, cols: slice, l0_per_px: float = 10.0) -> TissueMask:
    mask = np.zeros(shape_hw, bool)
    mask[rows, cols] = True
    return TissueMask(mask=mask, l0_per_px=l0_per_px)


def test_golden_plan_level_sizes_and_fractions() -> None:
    # 1000 x 800 l0 px at 0.5 um/px; model 100 px at 1 um/px -> 200 l0 px tiles, read at level 1 (ds 2) as 100 px.
    # Tissue covers l0 x 300-500, y 200-400 (mask 10 l0 px per pixel).
    plan = plan_tiles(_info(), _mask((80, 100), slice(20, 40), slice(30, 50)), input_mpp=1.0, input_size=100,
                      min_tissue=0.1)
    assert plan.grid_size_wh == (5, 4)
    assert (plan.level, plan.level_downsample, plan.lvl_tile_size) == (1, 2.0, 100)
    assert plan.l0_tile_size == 200.0 and plan.l0_stride == 200.0
    assert plan.l0_xy.tolist() == [[200, 200], [400, 200]]
    assert plan.t_grid_xy.tolist() == [[1, 1], [2, 1]]
    np.testing.assert_allclose(plan.tissue_fraction, [0.5, 0.5])
    assert plan.l0_xy.dtype == np.int64


def test_golden_plan_threshold_and_overlap() -> None:
    mask = _mask((80, 100), slice(20, 40), slice(30, 50))
    assert len(plan_tiles(_info(), mask, 1.0, 100, min_tissue=0.6)) == 0
    plan = plan_tiles(_info(), mask, 1.0, 100, min_tissue=0.6, overlap=0.5)
    assert plan.grid_size_wh == (9, 7)  # stride 100: ceil((1000 - 200) / 100) + 1, ceil((800 - 200) / 100) + 1
    assert plan.l0_stride == 100.0
    assert plan.l0_xy.tolist() == [[300, 200]]
    np.testing.assert_allclose(plan.tissue_fraction, [1.0])
    assert len(plan_tiles(_info(), mask, 1.0, 100, min_tissue=0.0)) == 20  # every grid tile


def test_plan_rows_are_row_major_and_cover_the_edges() -> None:
    plan = plan_tiles(_info(size_wh=(1050, 810)), _mask((81, 105), slice(None), slice(None)), 1.0, 100,
                      min_tissue=0.0)
    assert plan.grid_size_wh == (6, 5)  # 1050 needs a sixth column that runs past the edge
    order = plan.l0_xy[:, 1] * 10_000 + plan.l0_xy[:, 0]
    assert (np.diff(order) > 0).all()
    assert plan.l0_xy[-1].tolist() == [1000, 800]
    assert plan.tissue_fraction[-1] == pytest.approx(0.25 * 0.05, abs=1e-6)  # 50 x 10 of 200 x 200 inside


def test_fractional_tile_and_level_choice() -> None:
    # 0.499 um/px, 224 px at 1 um/px -> 448.9 l0 px; needed downsample 2.004 -> level 1 (never upsample).
    info = _info(size_wh=(2000, 2000), mpp=0.499)
    plan = plan_tiles(info, _mask((200, 200), slice(None), slice(None)), 1.0, 224, min_tissue=0.0)
    assert plan.l0_tile_size == pytest.approx(448.8978, abs=1e-4)
    assert (plan.level, plan.lvl_tile_size) == (1, 224)
    # corners i x 448.9 snapped to the level-1 pixel lattice (multiples of 2 level-0 px)
    assert plan.l0_xy[:5, 0].tolist() == [0, 448, 898, 1346, 1796]
    assert plan.extra["l0_align"] == 2.0
    coarse = plan_tiles(_info(size_wh=(2000, 2000), downsamples=(1.0, 4.0), mpp=0.499),
                        _mask((200, 200), slice(None), slice(None)), 1.0, 224, min_tissue=0.0)
    assert (coarse.level, coarse.lvl_tile_size) == (0, 448)  # 448.9 snapped to 2 x 224 (within 1 %)
    assert coarse.extra["l0_align"] == 2.0  # two level-0 px per input px: corners on even coordinates
    assert coarse.l0_xy[:5, 0].tolist() == [0, 448, 898, 1346, 1796]
    odd = plan_tiles(_info(size_wh=(2000, 2000), downsamples=(1.0, 4.0), mpp=0.499),
                     _mask((200, 200), slice(None), slice(None)), 0.75, 200, min_tissue=0.0)
    assert odd.lvl_tile_size == 301  # 300.6 px is 1.5 x 200: no multiple nearby, plain rounding



def test_plan_over_bounds_and_json_round_trip() -> None:
    info = _info(bounds=(100, 50, 500, 400))
    plan = plan_tiles(info, _mask((80, 100), slice(None), slice(None)), 1.0, 100, min_tissue=0.0)
    assert plan.grid_size_wh == (3, 2) and plan.l0_origin_xy == (100, 50)
    assert plan.l0_xy[0].tolist() == [100, 50]
    again = TilePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    np.testing.assert_array_equal(again.l0_xy, plan.l0_xy)
    np.testing.assert_array_equal(again.t_grid_xy, plan.t_grid_xy)
    assert again.to_dict() == plan.to_dict()


def test_plan_refuses_coarse_slides_and_bad_overlap(slides_dir: Path) -> None:
    with open_slide(slides_dir / "dicom_camelyon16_lowres") as slide:
        tissue = detect_tissue(slide)
        with pytest.raises(ResolutionTooLowError, match="coarser than the model"):
            plan_tiles(slide.info, tissue, input_mpp=1.0, input_size=224)
    with pytest.raises(ValueError, match="overlap"):
        plan_tiles(_info(), _mask((80, 100), slice(None), slice(None)), 1.0, 100, overlap=1.0)


def test_tissue_on_cmu_excludes_white_background(slides_dir: Path) -> None:
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        tissue = detect_tissue(slide)
        thumb = slide.read_scaled(tissue.mask.shape[::-1],
                                  (tissue.mask.shape[1] * tissue.l0_per_px, tissue.mask.shape[0] * tissue.l0_per_px))
    assert 0.25 < tissue.tissue_fraction < 0.55
    gray = thumb.mean(axis=2)
    assert gray[tissue.mask].mean() < 200  # tissue is darker than the glass
    assert gray[~tissue.mask].mean() > 225
    assert not tissue.mask[:40, :40].any()  # the top-left corner is glass
    assert tissue.mask.shape[0] * tissue.l0_per_px >= 2967


def test_tissue_on_kidney_finds_the_single_fragment(slides_dir: Path) -> None:
    with open_slide(slides_dir / "kidney-48-5.tif", mpp_override=4.0) as slide:
        tissue = detect_tissue(slide)
    assert 0.0 < tissue.tissue_fraction < 0.02


def test_tissue_on_synthetic_ellipse() -> None:
    img = tissue_image(400, 300, seed=1)
    mask = tissue_from_rgb(img, um_per_px=4.0)
    truth = img[..., 1] < 200
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95
    blank = tissue_from_rgb(np.full((100, 100, 3), 245, np.uint8), um_per_px=4.0)
    assert not blank.any()
    green = img.copy()
    green[:, :40] = (40, 160, 60)  # an ink stripe on glass
    assert not tissue_from_rgb(green, um_per_px=4.0)[:, :30].any()


def test_read_scaled_in_bands_matches_single_band(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_pyramid(tmp_path / "s.tif", tissue_image(800, 600), levels=1)
    with open_slide(path) as slide:
        whole = slide.read_scaled((200, 150)).astype(int)
        monkeypatch.setattr(slides, "BAND_BYTES", 800 * 3 * 40)  # bands of 10 output rows
        banded = slide.read_scaled((200, 150)).astype(int)
    assert np.abs(whole - banded).mean() < 1.0


def test_tissue_mask_size_is_bounded(slides_dir: Path) -> None:
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        tissue = detect_tissue(slide, target_um_per_px=1.0, max_long_side_px=300)
    assert max(tissue.mask.shape) <= 300
    assert tissue.l0_per_px == pytest.approx(2967 / 300)
    assert 0.25 < tissue.tissue_fraction < 0.55


def test_tissue_filling_the_field_is_all_tissue(glas_dir: Path) -> None:
    rgb = cv2.imread(str(glas_dir / "images" / "testB_3.png"))[..., ::-1]
    small = cv2.resize(rgb, (rgb.shape[1] // 4, rgb.shape[0] // 4), interpolation=cv2.INTER_AREA)
    # no glass in the field: Otsu must not split the tissue into "tissue" and "background" halves
    assert tissue_from_rgb(small, um_per_px=0.62 * 4, close_um=0.0, min_hole_um2=0.0).mean() > 0.95
