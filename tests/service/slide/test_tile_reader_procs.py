"""TileReader(processes=N): byte-identical to the thread path, errors name the tile, nothing is left behind."""

from __future__ import annotations

import os
import time
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np
import pytest
import tifffile

from service.analysis.plan import AnalysisOptions
from service.slide.errors import TileReadError
from service.slide.tile_reader import TileReader
from service.slide.tiling import TilePlan, TissueMask, plan_tiles
from service.slide.wsi import open_slide
from tests.test_bench_smoke import make_slide


def _plan(path: Path, input_mpp: float, size: int, mpp: float | None = None) -> TilePlan:
    with open_slide(path, mpp_override=mpp) as slide:
        w, h = slide.info.l0_size_wh
        mask = TissueMask(mask=np.ones((-(-h // 16), -(-w // 16)), bool), l0_per_px=16.0)
        return plan_tiles(slide.info, mask, input_mpp, size, min_tissue=0.0)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _segment_exists(name: str) -> bool:
    try:
        shm = SharedMemory(name)
    except FileNotFoundError:
        return False
    shm.close()
    return True


def _assert_released(pids: list[int], segments: list[str]) -> None:
    deadline = time.monotonic() + 5.0  # forkserver children are reaped by the server, a moment later
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(_gone(p) for p in pids), "worker processes outlived close()"
    assert not any(_segment_exists(n) for n in segments), "shared memory outlived close()"


def _identical_on(path: Path, plan: TilePlan, expect_scale: int) -> None:
    order = list(range(len(plan)))[::-1][:70]  # out of order, crossing batches and rows
    with TileReader(path, plan, threads=2) as threads:
        ref_all = threads.read(range(len(plan)))
        assert threads.decode_scale == expect_scale
    with TileReader(path, plan, processes=2) as procs:
        assert procs.fast and procs.processes == 2 and procs.decode_scale == expect_scale
        np.testing.assert_array_equal(procs.read(range(len(plan))), ref_all)
        batches = list(procs.iter_batches(order, batch_size=16, prefetch=2))  # every batch held at once
    assert [b[0].tolist() for b in batches] == [order[i : i + 16] for i in range(0, len(order), 16)]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), ref_all[order])


def test_cmu_processes_are_byte_identical_to_threads(cmu_small_path: Path) -> None:
    _identical_on(cmu_small_path, _plan(cmu_small_path, 0.499, 240), expect_scale=1)


def test_bench_slide_dct_scaled_processes_are_byte_identical(tmp_path: Path, data_dir: Path) -> None:
    spec = make_slide.SlideSpec((2048, 1536), 0.5, 0.25, 256, 80, "svs", 3)
    path = make_slide.write_slide(tmp_path / "bench.svs", spec, data_dir=data_dir, max_cells=4)
    _identical_on(path, _plan(path, 0.5, 224), expect_scale=2)  # 448 level-0 px per tile, decoded at 1/2


def test_damaged_tile_raises_tile_read_error_naming_it(tmp_path: Path, cmu_small_path: Path) -> None:
    data = bytearray(cmu_small_path.read_bytes())
    with tifffile.TiffFile(cmu_small_path) as tif:
        page = tif.series[0].levels[0].keyframe
        offset, count = int(page.dataoffsets[11]), int(page.databytecounts[11])
    data[offset : offset + count] = b"\x00" * count  # source tile 11: row 1, column 1 of 10 = plan tile 11
    broken = tmp_path / "broken.svs"
    broken.write_bytes(bytes(data))
    plan = _plan(broken, 0.499, 240)
    with TileReader(broken, plan, processes=2) as reader:
        assert reader.read([0]).shape == (1, 240, 240, 3)
        with pytest.raises(TileReadError, match="tile 11 at level-0 .* could not be read") as info:
            list(reader.iter_batches(range(len(plan)), batch_size=8))
        assert info.value.t_index == 11
        np.testing.assert_array_equal(reader.read([0, 1]), reader.read([0, 1]))  # still usable afterwards
        pids, segments = reader.process_reading.worker_pids(), reader.process_reading.segment_names()
    _assert_released(pids, segments)


def test_file_truncated_while_open_raises_tile_read_error(tmp_path: Path, cmu_small_path: Path) -> None:
    plan = _plan(cmu_small_path, 0.499, 240)
    cut = tmp_path / "cut.svs"
    cut.write_bytes(cmu_small_path.read_bytes())
    with tifffile.TiffFile(cut) as tif:
        keep = int(tif.series[0].levels[0].keyframe.dataoffsets[40])
    with TileReader(
        cut, plan, processes=2, cache_bytes=1
    ) as reader:  # a cache of one tile: reads hit the file
        reader.process_reading.wait_ready()  # both workers have opened the slide
        whole = reader.read(range(len(plan)))
        os.truncate(cut, keep)  # source tiles 40.. are gone (plan tile i reads source tile i here)
        np.testing.assert_array_equal(reader.read(range(40)), whole[:40])
        with pytest.raises(TileReadError, match="could not be read") as info:
            reader.read(range(len(plan)))
    assert info.value.t_index >= 40


def test_early_stop_and_close_leave_no_processes_or_shared_memory(cmu_small_path: Path) -> None:
    plan = _plan(cmu_small_path, 0.499, 240)
    reader = TileReader(cmu_small_path, plan, processes=2)
    batches = reader.iter_batches(range(len(plan)), batch_size=8, prefetch=2)
    idx, first = next(batches)
    batches.close()  # the consumer stops with two batches in flight
    pids, segments = reader.process_reading.worker_pids(), reader.process_reading.segment_names()
    assert len(pids) == 2 and len(segments) >= 3
    kept = first.copy()
    reader.close()
    _assert_released(pids, segments)
    np.testing.assert_array_equal(first, kept)  # a batch the consumer still holds stays readable
    assert idx.tolist() == list(range(8))


def test_read_region_path_falls_back_to_threads(missing_mpp_slide_path: Path) -> None:
    plan = _plan(missing_mpp_slide_path, 4.0, 64, mpp=2.0)
    with open_slide(missing_mpp_slide_path, mpp_override=2.0) as slide:
        with TileReader(slide, plan, threads=1) as threads:
            ref = threads.read(range(len(plan)))
        with TileReader(slide, plan, threads=1, processes=3) as reader:
            assert not reader.fast and reader.processes == 0 and reader.threads == 3
            np.testing.assert_array_equal(reader.read(range(len(plan))), ref)


def test_options_validate_and_record_reader_processes(cmu_small_path: Path) -> None:
    assert AnalysisOptions().reader_processes == 0
    assert AnalysisOptions.from_dict({"reader_processes": 4}).to_dict()["reader_processes"] == 4
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="reader_processes"):
            AnalysisOptions(reader_processes=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="processes"):
        TileReader(cmu_small_path, _plan(cmu_small_path, 0.499, 240), processes=-1)


def test_cli_flag_and_worker_setting_reach_the_options(tmp_path: Path) -> None:
    from service.cli.analyze import UsageError, options_from_args
    from service.cli.main import build_parser
    from service.jobs.worker import job_options
    from service.settings import Settings

    args = build_parser().parse_args(["analyze", "slide.svs", "--reader-processes", "3"])
    assert options_from_args(args).reader_processes == 3
    with pytest.raises(UsageError, match="reader_processes"):
        options_from_args(build_parser().parse_args(["analyze", "slide.svs", "--reader-processes", "-2"]))
    settings = Settings(storage_dir=tmp_path, reader_processes=4)
    job = {"options": '{"min_tissue": 0.2}'}  # a job's options never carry the worker's speed knobs
    assert job_options(job, settings).reader_processes == 4
    assert Settings(storage_dir=tmp_path).to_env()["PIXELCAM_READER_PROCESSES"] == "0"
