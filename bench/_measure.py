"""The measurements of bench_analyze: model alone, analysis, reading paths and the naive loop."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from _common import BenchError, clocked


class NoopPredictor:
    """Stands in for ``model.runtime.Predictor``: same interface, returns zeros without computing."""

    def __init__(self, real: Any) -> None:
        self.metadata, self.sha256 = real.metadata, real.sha256
        self.input_size, self.fm_size = real.input_size, real.fm_size
        self.calls = 0

    def predict(self, tiles: np.ndarray) -> Any:
        """Zeros of the right shapes; the tiles were read, decoded and resized to get here."""
        from model.runtime import Prediction

        self.calls += 1
        n = len(tiles)
        n_classes = self.metadata.num_classes
        return Prediction(
            class_probs=np.zeros((n, n_classes), np.float32),
            fg_prob=np.zeros((n, self.fm_size, self.fm_size), np.float32),
        )

    def predict_dense(self, regions: np.ndarray) -> Any:
        """Zeros of the dense outputs' shapes (a dense plan's regions were read to get here)."""
        from model.runtime import DensePrediction

        self.calls += 1
        k = self.metadata.output_stride
        n, h, w = regions.shape[0], regions.shape[1] // k, regions.shape[2] // k
        return DensePrediction(fg_prob=np.zeros((n, h, w), np.float32),
                               class_logits=np.zeros((n, self.metadata.num_classes, h, w), np.float32))


def plan_for(slide_path: Path, predictor: Any, job_dir: Path, options: Any) -> Any:
    """The pipeline's own tile plan for the slide (same tissue detection and grid as the analysis)."""
    from service.analysis.plan import prepare_job

    return prepare_job(slide_path, predictor.metadata, options, job_dir)


def measure_model_alone(predictor: Any, tiles: np.ndarray, n_tiles: int, batch: int) -> dict[str, Any]:
    """The ONNX model alone on pre-decoded uint8 batches: ``n_tiles`` tiles in batches of ``batch``."""
    batches = [tiles[i : i + batch] for i in range(0, len(tiles) - batch + 1, batch)]
    predictor.predict(batches[0])  # warm-up: allocations and kernel selection
    done = 0
    with clocked() as clock:
        while done < n_tiles:
            predictor.predict(batches[(done // batch) % len(batches)])
            done += batch
    return clock.rate(done)


def predecoded_regions(slide_path: Path, plan: Any, n: int) -> tuple[list[np.ndarray], list[int]]:
    """Up to ``n`` of a dense plan's regions (evenly spread) read once through the pipeline's own reader and cut to
    each region's rectangle as the pipeline cuts them, with the number of planned tiles each one holds: the dense
    model-alone measurement's input."""
    from service.analysis.inference import plan_reader
    from service.slide.wsi import open_slide

    regions = plan.region_plan
    picks = np.unique(np.linspace(0, len(regions) - 1, num=min(n, len(regions))).astype(int))
    counts = [len(r) for r in regions.tile_ranges()]
    out = []
    with open_slide(slide_path) as slide, plan_reader(slide, plan) as reader:
        for i in picks:
            w, h = regions.crop_in_wh(int(i))
            out.append(np.ascontiguousarray(reader.read([int(i)])[:, :h, :w]))
    return out, [counts[int(i)] for i in picks]


def measure_model_alone_dense(predictor: Any, regions: list[np.ndarray], counts: list[int],
                              n_tiles: int) -> dict[str, Any]:
    """The model alone on pre-read regions of a dense plan, one region per call as the pipeline runs them;
    the rate counts the planned tiles the regions hold (what the analysis's rate counts too)."""
    predictor.predict_dense(regions[0])  # warm-up
    done, k = 0, 0
    with clocked() as clock:
        while done < n_tiles:
            predictor.predict_dense(regions[k % len(regions)])
            done += counts[k % len(regions)]
            k += 1
    return clock.rate(done)


def measure_analysis(
    slide_path: Path, predictor: Any, out_dir: Path, n_tiles: int, options: Any
) -> dict[str, Any]:
    """``analyze_slide`` end to end (open, tissue, plan, read, infer, stitch, write outputs)."""
    from service.analysis.pipeline import analyze_slide

    with clocked() as clock:
        result = analyze_slide(slide_path, predictor, out_dir, options)
    return {
        **clock.rate(n_tiles),
        "phases_s": result.result.get("timings_s", {}),
        "regions": result.result.get("evidence", {}).get("regions"),
    }


def measure_pipeline_reading(slide_path: Path, plan: Any, noop: NoopPredictor) -> dict[str, Any]:
    """The analysis's read + decode + resize path over every planned tile, the model a no-op.

    One reader for the whole plan, built from the plan's options and driven by `infer_in_chunks`, as
    `analyze_slide` does (the reader's start, e.g. its worker processes, is part of the time).
    """
    from service.analysis.inference import infer_in_chunks, plan_reader, run_chunk
    from service.slide.wsi import open_slide

    with open_slide(slide_path) as slide:
        # warm-up (imports, page cache of the head): the first chunk of about 32 tiles (whole regions if dense)
        run_chunk(slide, plan, plan.chunks(32)[0] if len(plan) else range(0), noop)
    done = 0
    with (
        clocked() as clock,
        open_slide(slide_path) as slide,
        plan_reader(slide, plan) as reader,
    ):
        for _, out in infer_in_chunks(reader, plan, noop, lambda n: None):
            done += len(out.class_probs)
    if done != len(plan):
        raise BenchError(f"the reader returned {done} outputs for {len(plan)} tiles")
    return clock.rate(done)


def _openslide_tile(osl: Any, l0_xy: np.ndarray, level: int, lvl_side: int, in_side: int) -> np.ndarray:
    """What a user writes with OpenSlide: read_region, drop alpha, resize to the model input."""
    rgb = np.asarray(
        osl.read_region((int(l0_xy[0]), int(l0_xy[1])), level, (lvl_side, lvl_side)).convert("RGB")
    )
    if lvl_side != in_side:
        rgb = cv2.resize(rgb, (in_side, in_side), interpolation=cv2.INTER_AREA)
    return rgb


def measure_openslide_reading(slide_path: Path, plan: Any, in_side: int, threads: int) -> dict[str, Any]:
    """OpenSlide ``read_region`` on the same tiles, ``threads`` threads sharing one handle (it is thread-safe)."""
    import openslide

    lvl_side, level = int(plan.tiles.lvl_tile_size), int(plan.tiles.level)
    with openslide.OpenSlide(str(slide_path)) as warm:  # warm-up on its own handle: OpenSlide caches tiles
        for i in range(min(32, len(plan))):
            _openslide_tile(warm, plan.l0_xy[i], level, lvl_side, in_side)
    with openslide.OpenSlide(str(slide_path)) as osl:

        def read(i: int) -> int:
            return int(_openslide_tile(osl, plan.l0_xy[i], level, lvl_side, in_side)[0, 0, 0])

        with clocked() as clock, ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(read, range(len(plan)), chunksize=16))
    return clock.rate(len(plan))


def measure_naive(
    slide_path: Path, plan: Any, torch_model: Any, n_tiles: int, threads: int, device: str = "cpu"
) -> dict[str, Any]:
    """The naive loop: OpenSlide read_region + torch eager, batch 1, one tile after the other, on ``device``.

    Each tile's outputs come back to the host (`.cpu()`) before the next is read, as a user's loop would.
    """
    import openslide
    import torch

    from model.export import OnnxWrapper

    torch.set_num_threads(threads)
    wrapper = OnnxWrapper(torch_model.to(device), torch_model.config).eval()
    in_side = torch_model.config.input_size
    picks = np.linspace(0, len(plan.l0_xy) - 1, num=min(n_tiles, len(plan.l0_xy))).astype(int)
    osl = openslide.OpenSlide(str(slide_path))
    try:
        with torch.no_grad():
            for i in picks[:2]:  # warm-up
                tile = _openslide_tile(osl, plan.l0_xy[i], plan.tiles.level, plan.tiles.lvl_tile_size, in_side)
                wrapper(torch.from_numpy(tile)[None].to(device))
            with clocked() as clock:
                for i in picks:
                    tile = _openslide_tile(
                        osl, plan.l0_xy[i], plan.tiles.level, int(plan.tiles.lvl_tile_size), in_side
                    )
                    probs, fg = wrapper(torch.from_numpy(tile)[None].to(device))
                    probs.cpu().numpy(), fg.cpu().numpy()
    finally:
        osl.close()
    return clock.rate(len(picks))


def predecoded_tiles(slide_path: Path, plan: Any, in_side: int, n: int) -> np.ndarray:
    """Up to ``n`` planned tiles read and resized once, as the model-alone measurement's input (N, S, S, 3)."""
    from service.slide.wsi import open_slide

    slide = open_slide(slide_path)
    try:
        side = int(plan.tiles.lvl_tile_size)
        picks = np.linspace(0, len(plan.l0_xy) - 1, num=min(n, len(plan.l0_xy))).astype(int)
        tiles = []
        for i in picks:
            rgb = slide.read_region(
                (int(plan.l0_xy[i][0]), int(plan.l0_xy[i][1])), plan.tiles.level, (side, side)
            )
            tiles.append(cv2.resize(rgb, (in_side, in_side), interpolation=cv2.INTER_AREA))
    finally:
        slide.close()
    return np.stack(tiles)
