"""Deep Zoom geometry against the DZI rules, slide tiles against OpenSlide, overlay alignment with the slide."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest

from service.outputs.deepzoom import (
    COLORMAPS,
    DZI_NAMESPACE,
    ArrayHeatmap,
    DeepZoomError,
    DeepZoomGeometry,
    TileOutOfRangeError,
    UnknownColormapError,
    best_level_for_downsample,
    colormap_lut,
    dzi_xml,
    encode_tile,
    render_overlay_tile,
)

CMU_WH = (2220, 2967)


def _halvings(size: int, times: int) -> int:
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


def test_level_count_and_sizes_follow_the_dzi_rules() -> None:
    geo = DeepZoomGeometry(CMU_WH)
    # L = ceil(log2(2967)) = 12 (2048 < 2967 <= 4096), so 13 levels, level 0 is 1x1.
    assert geo.max_level == 12
    assert geo.level_count == 13
    assert geo.level_size_wh(12) == CMU_WH
    assert geo.level_size_wh(11) == (1110, 1484)
    assert geo.level_size_wh(0) == (1, 1)
    for z in range(geo.level_count):
        k = geo.max_level - z
        assert geo.level_size_wh(z) == (_halvings(CMU_WH[0], k), _halvings(CMU_WH[1], k))


@pytest.mark.parametrize(
    ("size_wh", "max_level"),
    [((1, 1), 0), ((2, 1), 1), ((256, 256), 8), ((257, 10), 9), ((16, 16), 4), ((300, 250), 9)],
)
def test_top_level_is_ceil_log2_of_the_longer_side(size_wh: tuple[int, int], max_level: int) -> None:
    geo = DeepZoomGeometry(size_wh)
    assert geo.max_level == max_level
    assert geo.level_size_wh(max_level) == size_wh
    assert geo.level_size_wh(0) == (1, 1)


def test_tile_grid_and_edge_tiles_at_full_resolution() -> None:
    geo = DeepZoomGeometry(CMU_WH, tile_size=254, overlap=1)
    assert geo.tile_grid_wh(12) == (9, 12)  # ceil(2220/254), ceil(2967/254)
    first = geo.tile_region(12, 0, 0)
    assert (first.dz_xy, first.dz_size_wh) == ((0, 0), (255, 255))  # overlap only on the right/bottom
    interior = geo.tile_region(12, 1, 1)
    assert (interior.dz_xy, interior.dz_size_wh) == ((253, 253), (256, 256))  # 254 + 2 overlap
    last = geo.tile_region(12, 8, 11)
    # last column starts at 8*254 - 1 = 2031 and stops at the edge: 2220 - 2031 = 189 wide, no right overlap
    assert (last.dz_xy, last.dz_size_wh) == ((2031, 2793), (189, 174))
    assert last.l0_xy == (2031, 2793) and last.l0_size_wh == (189, 174)


def test_tiles_cover_each_level_exactly_once_without_overlap() -> None:
    geo = DeepZoomGeometry((1000, 613), tile_size=254, overlap=1)
    for z in range(geo.level_count):
        dz_w, dz_h = geo.level_size_wh(z)
        covered = np.zeros((dz_h, dz_w), dtype=np.int32)
        cols, rows = geo.tile_grid_wh(z)
        for col in range(cols):
            for row in range(rows):
                tile = geo.tile_region(z, col, row)
                x, y = tile.dz_xy
                w, h = tile.dz_size_wh
                left = geo.overlap if col > 0 else 0
                top = geo.overlap if row > 0 else 0
                right = geo.overlap if col < cols - 1 else 0
                bottom = geo.overlap if row < rows - 1 else 0
                assert w - left - right <= geo.tile_size and h - top - bottom <= geo.tile_size
                covered[y + top:y + h - bottom, x + left:x + w - right] += 1
                # the level-0 rectangle is the DZ rectangle scaled by the level's downsample, clipped to the image
                d = 2 ** (geo.max_level - z)
                assert tile.l0_xy == (x * d, y * d)
                assert tile.l0_size_wh == (min((x + w) * d, 1000) - x * d, min((y + h) * d, 613) - y * d)
        assert (covered == 1).all(), f"level {z} is not covered exactly once"


def test_out_of_range_levels_and_tiles_raise() -> None:
    geo = DeepZoomGeometry(CMU_WH)
    with pytest.raises(TileOutOfRangeError):
        geo.tile_region(13, 0, 0)
    with pytest.raises(TileOutOfRangeError):
        geo.tile_region(-1, 0, 0)
    with pytest.raises(TileOutOfRangeError):
        geo.tile_region(12, 9, 0)
    with pytest.raises(TileOutOfRangeError):
        geo.tile_region(0, 0, 1)
    with pytest.raises(DeepZoomError):
        DeepZoomGeometry((0, 10))


def test_geometry_matches_openslide_deepzoom_generator(slides_dir: Path) -> None:
    openslide = pytest.importorskip("openslide")
    from openslide.deepzoom import DeepZoomGenerator

    with openslide.OpenSlide(str(slides_dir / "CMU-1-Small-Region.svs")) as osr:
        ref = DeepZoomGenerator(osr, tile_size=254, overlap=1, limit_bounds=False)
        geo = DeepZoomGeometry(osr.dimensions, 254, 1)
        assert geo.level_count == ref.level_count
        assert geo.level_sizes_wh == list(ref.level_dimensions)
        for z in range(geo.level_count):
            assert geo.tile_grid_wh(z) == ref.level_tiles[z]
            cols, rows = ref.level_tiles[z]
            for col, row in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2)}:
                tile = geo.tile_region(z, col, row)
                assert tile.dz_size_wh == ref.get_tile_dimensions(z, (col, row))
                assert tile.l0_xy == ref.get_tile_coordinates(z, (col, row))[0]


def test_dzi_xml_is_the_deep_zoom_descriptor() -> None:
    root = ET.fromstring(dzi_xml(CMU_WH, 254, 1, "jpeg"))
    assert root.tag == f"{{{DZI_NAMESPACE}}}Image"
    assert root.attrib == {"TileSize": "254", "Overlap": "1", "Format": "jpeg"}
    size = root.find(f"{{{DZI_NAMESPACE}}}Size")
    assert size is not None and size.attrib == {"Width": "2220", "Height": "2967"}


def test_best_level_never_reads_a_coarser_level_than_asked() -> None:
    downsamples = [1.0, 4.0, 16.0, 64.0]
    assert best_level_for_downsample(downsamples, 1) == 0
    assert best_level_for_downsample(downsamples, 2) == 0
    assert best_level_for_downsample(downsamples, 4) == 1
    assert best_level_for_downsample(downsamples, 32) == 2
    assert best_level_for_downsample(downsamples, 4096) == 3
    assert best_level_for_downsample([1.0, 4.0161], 4) == 0  # rounding of odd sizes must not pick the coarser one


def test_colormaps_are_256_entry_rgb_tables() -> None:
    for name in COLORMAPS:
        lut = colormap_lut(name)
        assert lut.shape == (256, 3) and lut.dtype == np.uint8
        assert len({tuple(c) for c in lut}) > 64, f"{name} is not a ramp"
    jet = colormap_lut("jet")
    assert jet[0, 2] > 100 and jet[0, 0] < 50  # jet starts blue (RGB order)
    assert jet[255, 0] > 100 and jet[255, 2] < 50  # and ends red
    assert (colormap_lut("gray")[:, 0] == np.arange(256)).all()
    with pytest.raises(UnknownColormapError, match="choose one of"):
        colormap_lut("rainbow-unicorn")


def _square_heatmap(hm_downsample: float) -> tuple[ArrayHeatmap, tuple[int, int, int, int]]:
    """A 1000x613 slide's heatmap: analysed zeros, a 0.9 square at cells x 40..50, y 20..30, NaN in one corner."""
    hm = np.zeros((math.ceil(613 / hm_downsample), math.ceil(1000 / hm_downsample)), dtype=np.float32)
    hm[20:30, 40:50] = 0.9
    hm[:5, :5] = np.nan
    l0_box = (int(40 * hm_downsample), int(20 * hm_downsample), int(50 * hm_downsample), int(30 * hm_downsample))
    return ArrayHeatmap(hm, hm_downsample, min_level_size=16), l0_box


@pytest.mark.parametrize("dz_level_offset", [0, 1, 2])
def test_overlay_lights_up_exactly_over_the_square(dz_level_offset: int) -> None:
    heatmap, (x0, y0, x1, y1) = _square_heatmap(8.0)
    geo = DeepZoomGeometry((1000, 613))
    z = geo.max_level - dz_level_offset
    d = 2 ** dz_level_offset
    cols, rows = geo.tile_grid_wh(z)
    hot = colormap_lut("jet")[round(0.9 * 255)]
    for col in range(cols):
        for row in range(rows):
            tile = geo.tile_region(z, col, row)
            rgba = render_overlay_tile(heatmap, geo, z, col, row, cmap="jet", threshold=0.5)
            assert rgba.shape == (tile.dz_size_wh[1], tile.dz_size_wh[0], 4)
            # expected: DZ pixels whose level-0 span centre falls inside the square
            dz_x = tile.dz_xy[0] + np.arange(tile.dz_size_wh[0])
            dz_y = tile.dz_xy[1] + np.arange(tile.dz_size_wh[1])
            in_x = (dz_x * d + d / 2 >= x0) & (dz_x * d + d / 2 < x1)
            in_y = (dz_y * d + d / 2 >= y0) & (dz_y * d + d / 2 < y1)
            expected = in_y[:, None] & in_x[None, :]
            assert ((rgba[..., 3] == 255) == expected).all(), f"level {z} tile {col}_{row} misaligned"
            assert (rgba[expected][:, :3] == hot).all()
    # at full resolution the lit block is exactly the square's level-0 pixels
    if dz_level_offset == 0:
        tile = geo.tile_region(z, 1, 0)
        rgba = render_overlay_tile(heatmap, geo, z, 1, 0)
        ys, xs = np.nonzero(rgba[..., 3])
        assert (xs.min() + tile.l0_xy[0], xs.max() + 1 + tile.l0_xy[0]) == (x0, x1)
        assert (ys.min() + tile.l0_xy[1], ys.max() + 1 + tile.l0_xy[1]) == (y0, y1)


def test_overlay_threshold_and_unanalysed_cells() -> None:
    heatmap, _ = _square_heatmap(8.0)
    geo = DeepZoomGeometry((1000, 613))
    z = geo.max_level
    rgba = render_overlay_tile(heatmap, geo, z, 0, 0, cmap="viridis", threshold=0.0)
    corner = rgba[: 5 * 8, : 5 * 8]
    assert (corner[..., 3] == 0).all(), "not analysed must stay transparent even at threshold 0"
    assert (rgba[60:100, 60:100, 3] == 255).all(), "analysed zeros show at threshold 0"
    assert (rgba[60:100, 60:100, :3] == colormap_lut("viridis")[0]).all()
    above = render_overlay_tile(heatmap, geo, z, 1, 0, threshold=0.95)
    assert (above[..., 3] == 0).all(), "0.9 is below a 0.95 threshold"
    with pytest.raises(DeepZoomError):
        render_overlay_tile(heatmap, geo, z, 0, 0, threshold=1.5)
    with pytest.raises(UnknownColormapError):
        render_overlay_tile(heatmap, geo, z, 0, 0, cmap="nope")


def test_overlay_uses_the_heatmap_pyramid_when_zoomed_out() -> None:
    heatmap, _ = _square_heatmap(8.0)
    assert heatmap.level_downsamples[:3] == (1.0, 2.0, 4.0)
    geo = DeepZoomGeometry((1000, 613))
    rgba = render_overlay_tile(heatmap, geo, 3, 0, 0, threshold=0.0)  # 8x8 px level: 128 l0 px per DZ px
    assert rgba.shape == (5, 8, 4)
    assert (rgba[..., 3] == 255).sum() > 0


def test_heatmap_beyond_its_extent_is_transparent() -> None:
    hm = np.full((10, 10), 1.0, dtype=np.float32)  # covers l0 0..80 of a 1000-wide slide
    geo = DeepZoomGeometry((1000, 613))
    rgba = render_overlay_tile(ArrayHeatmap(hm, 8.0), geo, geo.max_level, 0, 0)
    assert (rgba[:80, :80, 3] == 255).all()
    assert (rgba[80:, :, 3] == 0).all() and (rgba[:, 80:, 3] == 0).all()


def test_encoded_tiles_decode_back() -> None:
    rgba = np.zeros((7, 9, 4), dtype=np.uint8)
    rgba[2:5, 3:6] = (255, 0, 0, 255)
    png = encode_tile(rgba, "png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    back = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.shape == (7, 9, 4)
    assert (back[..., [2, 1, 0, 3]] == rgba).all()  # lossless, alpha kept
    jpeg = encode_tile(np.full((16, 16, 3), (200, 30, 40), np.uint8), "jpeg")
    assert jpeg[:2] == b"\xff\xd8"
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    assert np.abs(decoded.astype(int) - (200, 30, 40)).max() < 12


def test_tiff_heatmap_matches_the_array_it_was_written_from(tmp_path: Path) -> None:
    from service.outputs.deepzoom import TiffHeatmap, decode_stored_heatmap
    from service.outputs.stitching import HeatmapBand, HeatmapGrid, write_heatmap_tiff

    grid = HeatmapGrid((9000, 5000), 8.0)  # 1125 x 625 cells: a 3-level TIFF pyramid
    hm_w, hm_h = grid.hm_size_wh
    rng = np.random.default_rng(0)
    prob = rng.random((hm_h, hm_w), dtype=np.float32)
    covered = np.ones((hm_h, hm_w), dtype=bool)
    covered[100:300, 200:500] = False
    path = tmp_path / "heatmap.tif"
    write_heatmap_tiff(path, [HeatmapBand(0, prob, covered)], grid, l0_mpp=0.5, description="test")
    tiff = TiffHeatmap(path, 8.0)
    assert tiff.level_size_wh(0) == (hm_w, hm_h)
    assert tiff.level_downsamples[:3] == (1.0, 2.0, 4.0)
    stored = np.where(covered, 1 + np.rint(prob * 254), 0).astype(np.uint8)
    reference = ArrayHeatmap(decode_stored_heatmap(stored), 8.0)
    geo = DeepZoomGeometry(grid.l0_size_wh)
    for z, col, row in [(geo.max_level, 7, 3), (geo.max_level, 35, 19), (geo.max_level - 2, 2, 1)]:
        got = render_overlay_tile(tiff, geo, z, col, row, threshold=0.0)
        want = render_overlay_tile(reference, geo, z, col, row, threshold=0.0)
        assert (got == want).all(), f"tile {z}/{col}_{row} differs"
    # tile (8, 4) at full resolution spans l0 x 2031..2287, y 1015..1271: inside the uncovered block
    # (cells x 200..500, y 100..300 = l0 x 1600..4000, y 800..2400)
    assert (render_overlay_tile(tiff, geo, geo.max_level, 8, 4, threshold=0.0)[..., 3] == 0).all()
    assert (render_overlay_tile(tiff, geo, geo.max_level, 7, 3, threshold=0.0)[:39, :, 3] == 255).all()
    # zoomed out the two pyramids (TIFF halving vs nan-mean) agree on coverage and nearly on colour
    z = geo.max_level - 4
    got = render_overlay_tile(tiff, geo, z, 1, 0, cmap="gray", threshold=0.0)
    want = render_overlay_tile(reference, geo, z, 1, 0, cmap="gray", threshold=0.0)
    assert (got[..., 3] == want[..., 3]).all()
    assert np.abs(got[..., 0].astype(int) - want[..., 0].astype(int)).max() <= 2
    tiff.close()


def test_slide_tiles_match_openslide_deepzoom(slides_dir: Path) -> None:
    openslide = pytest.importorskip("openslide")
    from openslide.deepzoom import DeepZoomGenerator

    from service.outputs.deepzoom import render_slide_tile
    from service.slide.wsi import open_slide

    path = slides_dir / "CMU-1-Small-Region.svs"
    with open_slide(path) as slide, openslide.OpenSlide(str(path)) as osr:
        geo = DeepZoomGeometry(slide.info.l0_size_wh)
        ref = DeepZoomGenerator(osr, tile_size=254, overlap=1, limit_bounds=False)
        for z, col, row in [(12, 0, 0), (12, 4, 5), (12, 8, 11), (11, 2, 3), (9, 0, 0), (5, 0, 0)]:
            ours = render_slide_tile(slide, geo, z, col, row)
            theirs = np.asarray(ref.get_tile(z, (col, row)).convert("RGB"))
            assert ours.shape == theirs.shape
            diff = np.abs(ours.astype(int) - theirs.astype(int))
            # same pixels at full resolution; resampling filters differ a little when zoomed out
            assert diff.mean() < (0.5 if z == 12 else 6.0), f"tile {z}/{col}_{row}: mean diff {diff.mean():.2f}"


def test_slide_tiles_read_the_best_pyramid_level(slides_dir: Path) -> None:
    from service.outputs.deepzoom import render_slide_tile
    from service.slide.wsi import open_slide

    with open_slide(slides_dir / "boxes_pyramid.tiff", mpp_override=1.0) as slide:  # its tags say 72 dpi
        calls: list[tuple[int, tuple[int, int]]] = []
        real_read = slide.read_region

        def spy(l0_xy: tuple[int, int], level: int, lvl_size_wh: tuple[int, int]) -> np.ndarray:
            calls.append((level, tuple(lvl_size_wh)))
            return real_read(l0_xy, level, lvl_size_wh)

        slide.read_region = spy  # type: ignore[method-assign]
        geo = DeepZoomGeometry(slide.info.l0_size_wh)  # 300 x 250 -> top level 9
        downsamples = slide.info.level_downsamples
        for z in range(geo.level_count):
            calls.clear()
            tile = render_slide_tile(slide, geo, z, 0, 0)
            assert tile.shape[:2] == geo.tile_region(z, 0, 0).dz_size_wh[::-1]
            (level, lvl_wh), = calls
            d = 2 ** (geo.max_level - z)
            assert downsamples[level] <= d * 1.001, "read a coarser level than the tile's scale"
            finer_ok = [i for i, ds in enumerate(downsamples) if ds <= d * 1.001]
            assert level == max(finer_ok), "did not use the coarsest level that is still fine enough"
            l0_w = geo.tile_region(z, 0, 0).l0_size_wh[0]
            assert lvl_wh[0] == math.ceil(l0_w / downsamples[level])
