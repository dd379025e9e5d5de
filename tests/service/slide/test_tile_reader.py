"""The fast tile path: pixel parity with read_region, edges, fallback, and batch prefetch order."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from service.slide.tile_reader import TileReader
from service.slide.tiling import TilePlan, TissueMask, plan_tiles
from service.slide.wsi import Slide, open_slide
from tests.service.synth import tissue_image, write_pyramid


def _reference(slide: Slide, plan: TilePlan, size: int) -> np.ndarray:
    """The same tiles through Slide.read_region and a plain OpenCV area resize."""
    out = []
    for xy in plan.l0_xy:
        region = slide.read_region((int(xy[0]), int(xy[1])), plan.level, (plan.lvl_tile_size,) * 2)
        if plan.lvl_tile_size != size:
            region = cv2.resize(region, (size, size), interpolation=cv2.INTER_AREA)
        out.append(region)
    return np.stack(out)


def _all_tissue(slide: Slide) -> TissueMask:
    w, h = slide.info.l0_size_wh
    return TissueMask(mask=np.ones((-(-h // 16), -(-w // 16)), bool), l0_per_px=16.0)


@pytest.mark.parametrize(("input_mpp", "size"), [(0.499, 240), (1.0, 224)])
def test_cmu_fast_path_matches_read_region(slides_dir: Path, input_mpp: float, size: int) -> None:
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        plan = plan_tiles(slide.info, _all_tissue(slide), input_mpp, size, min_tissue=0.0)
        with TileReader(slide, plan, threads=2) as reader:
            assert reader.fast
            tiles = reader.read(range(len(plan)))
        ref = _reference(slide, plan, size)
    assert tiles.shape == (len(plan), size, size, 3) and tiles.dtype == np.uint8
    diff = np.abs(tiles.astype(np.int16) - ref.astype(np.int16))
    assert diff.mean() < 2.0
    last = plan.l0_xy[-1]  # the bottom-right tile runs past the slide: white there, like read_region
    assert last[0] + plan.l0_tile_size > slide.info.l0_size_wh[0]
    assert (tiles[-1][-5:, -5:] == 255).all()


def test_ycbcr_pyramid_level_one_matches_read_region(tmp_path: Path) -> None:
    image = tissue_image(1024, 768, seed=3)
    path = tmp_path / "ycbcr.tif"
    with tifffile.TiffWriter(path) as tw:
        for lvl in range(3):
            tw.write(image[:: 2**lvl, :: 2**lvl], tile=(128, 128), compression="jpeg", photometric="ycbcr",
                     subsampling=(2, 2), subfiletype=1 if lvl else 0,
                     **({"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"} if lvl == 0 else {}))
    with open_slide(path) as slide:
        plan = plan_tiles(slide.info, _all_tissue(slide), 1.0, 100, min_tissue=0.0)
        assert plan.level == 1 and plan.lvl_tile_size == 100
        with TileReader(path, plan, threads=2) as reader:
            assert reader.fast
            tiles = reader.read(range(len(plan)))
        ref = _reference(slide, plan, 100)
    assert np.abs(tiles.astype(np.int16) - ref.astype(np.int16)).mean() < 2.0


def test_lossless_tiles_decode_exactly(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "deflate.tif", tissue_image(600, 400, seed=4), levels=1, compression="zlib")
    with open_slide(path) as slide:
        plan = plan_tiles(slide.info, _all_tissue(slide), 0.5, 96, min_tissue=0.0)
        with TileReader(slide, plan, threads=2) as reader:
            assert reader.fast
            tiles = reader.read(range(len(plan)))
        np.testing.assert_array_equal(tiles, _reference(slide, plan, 96))


def test_untiled_slide_falls_back_to_read_region(slides_dir: Path) -> None:
    with open_slide(slides_dir / "kidney-48-5.tif", mpp_override=2.0) as slide:
        plan = plan_tiles(slide.info, _all_tissue(slide), 4.0, 64, min_tissue=0.0)
        with TileReader(slide, plan, threads=2) as reader:
            assert not reader.fast
            tiles = reader.read(range(0, len(plan), 3))
            assert reader.open_handles <= 2  # one slide handle per worker thread
        ref = _reference(slide, plan, 64)[::3]
    np.testing.assert_array_equal(tiles, ref)


def test_iter_batches_keeps_order_and_matches_read(slides_dir: Path) -> None:
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        plan = plan_tiles(slide.info, _all_tissue(slide), 0.499, 240, min_tissue=0.0)
    order = [17, 3, 3, 90, 0, 44, 45, 46, 101, 7, 12]
    with TileReader(slides_dir / "CMU-1-Small-Region.svs", plan, threads=2) as reader:
        batches = list(reader.iter_batches(order, batch_size=4, prefetch=2))
        direct = reader.read(order)
        empty = reader.read([])
    assert [b[0].tolist() for b in batches] == [order[0:4], order[4:8], order[8:11]]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), direct)
    np.testing.assert_array_equal(direct[1], direct[2])
    assert empty.shape == (0, 240, 240, 3)


def test_input_size_override_resizes(slides_dir: Path) -> None:
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        plan = plan_tiles(slide.info, _all_tissue(slide), 0.499, 240, min_tissue=0.5)
        with TileReader(slide, plan, input_size=120, threads=1) as reader:
            small = reader.read([0])
        full = _reference(slide, plan, 240)[0]
    expected = cv2.resize(full, (120, 120), interpolation=cv2.INTER_AREA)
    assert small.shape == (1, 120, 120, 3)
    assert np.abs(small[0].astype(np.int16) - expected.astype(np.int16)).mean() < 1.0


def test_corrupt_tile_raises_tile_read_error(tmp_path: Path, slides_dir: Path) -> None:
    from service.slide.errors import TileReadError

    data = bytearray((slides_dir / "CMU-1-Small-Region.svs").read_bytes())
    with tifffile.TiffFile(slides_dir / "CMU-1-Small-Region.svs") as tif:
        page = tif.series[0].levels[0].keyframe
        offset, count = int(page.dataoffsets[11]), int(page.databytecounts[11])
    data[offset:offset + count] = b"\x00" * count  # source tile 11: row 1, column 1 of 10
    broken = tmp_path / "broken.svs"
    broken.write_bytes(bytes(data))
    with open_slide(broken) as slide:
        plan = plan_tiles(slide.info, _all_tissue(slide), 0.499, 240, min_tissue=0.0)
        with TileReader(slide, plan, threads=2) as reader:
            assert reader.read([0]).shape == (1, 240, 240, 3)
            with pytest.raises(TileReadError, match="could not be read") as info:
                list(reader.iter_batches(range(len(plan)), batch_size=8))
    assert info.value.t_index == 11


def test_dct_scaled_decode_matches_area_resize(tmp_path: Path) -> None:
    path = tmp_path / "ycbcr0.tif"
    tifffile.imwrite(path, tissue_image(1024, 768, seed=5), tile=(128, 128), compression="jpeg",
                     photometric="ycbcr", subsampling=(2, 2), resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    with open_slide(path) as slide:  # 0.25 um/px, model 100 px at 1 um/px: read 400 px, k = 4
        plan = plan_tiles(slide.info, _all_tissue(slide), 1.0, 100, min_tissue=0.0)
        assert (plan.level, plan.lvl_tile_size) == (0, 400)
        ref = _reference(slide, plan, 100)
        with TileReader(slide, plan, threads=2) as reader:
            assert reader.decode_scale == 4
            scaled = reader.read(range(len(plan)))
        with TileReader(slide, plan, threads=2, scaled_decode=False) as reader:
            assert reader.decode_scale == 1
            full = reader.read(range(len(plan)))
    assert np.abs(scaled.astype(np.int16) - ref.astype(np.int16)).mean() < 2.0
    assert np.abs(full.astype(np.int16) - ref.astype(np.int16)).mean() < 0.5
    assert (scaled[-1][-10:, -10:] == 255).all()  # past the right and bottom edges


def test_batches_are_read_ahead_while_the_consumer_works(slides_dir: Path) -> None:
    import threading
    import time

    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        plan = plan_tiles(slide.info, _all_tissue(slide), 0.499, 240, min_tissue=0.0)
        with TileReader(slide, plan, threads=2) as reader:
            done: list[int] = []
            lock = threading.Lock()
            original = reader._read_tile

            def counting(out: np.ndarray, slot: int, t_index: int) -> None:
                original(out, slot, t_index)
                with lock:
                    done.append(t_index)

            reader._read_tile = counting  # type: ignore[method-assign]
            batches = reader.iter_batches(range(40), batch_size=4, prefetch=2)
            next(batches)  # the consumer now "runs the model" on batch 0
            deadline = time.monotonic() + 10.0
            while len(done) < 12 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sorted(done)[:12] == list(range(12))  # batches 1 and 2 were read during that time
            time.sleep(0.05)
            assert len(done) == 12  # and no more than `prefetch` batches ahead
            batches.close()


def test_subifd_pyramid_level_read_directly(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "sub.tif", tissue_image(1024, 768, seed=6), subifds=True, tile=128)
    with open_slide(path) as slide:
        assert slide.info.backend == "tiffslide"
        plan = plan_tiles(slide.info, _all_tissue(slide), 1.0, 64, min_tissue=0.0)
        assert (plan.level, plan.lvl_tile_size) == (1, 64)
        with TileReader(slide, plan, threads=2) as reader:
            assert reader.fast
            tiles = reader.read(range(len(plan)))
        np.testing.assert_array_equal(tiles, _reference(slide, plan, 64))
