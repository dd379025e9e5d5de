"""Score a model the way users meet it: each test image written as a slide and analysed by the service's own code.

Every image becomes a tiled TIFF slide at its source resolution (GlaS: 0.62005 µm/px, in the TIFF resolution
tags, read back by the slide reader as the slide's mpp), then `service.analysis.pipeline.analyze_slide` runs it
with default `AnalysisOptions` (what `pixelcam analyze` does: tissue detection, tiles at the model's scale,
dense inference when the model allows, stitching). Scored against the labels and gland masks:

- slide-path accuracy: result.json's slide class against the image's label;
- slide-path PxAP: heatmap.tif decoded to probabilities and looked up at every image pixel (pixel (x, y) reads
  cell (x // hm_downsample, y // hm_downsample): the heatmap's own level-0 frame), pooled over the split with the
  whole-image evaluation's `PixelCounts`. Pixels the analysis left out (no tissue tile there) score 0: the
  service said nothing there, which is what a user sees; the share of gland pixels left out is reported.

    python -m training.slide_eval MODEL.onnx [--split test|train|valcl|valpx --splits RUN/splits.json]
        [--out DIR] [--limit N] [--data-dir DIR]
    python -m training.slide_eval MODEL.onnx --manifest manifest.csv [--split test|all]   # a slides manifest

Planes: `l0_` level-0 slide pixels = image pixels at the source resolution, `hm_` heatmap cells.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from tqdm import tqdm

from model.runtime import Predictor
from service.analysis.pipeline import analyze_slide
from service.analysis.plan import AnalysisOptions
from service.outputs.annotations import rasterize, read_annotations, select_classes
from service.outputs.stitching import decode_heatmap
from training.config import GLAS_MPP
from training.data import Record, default_data_dir, load_glas, read_rgb
from training.metrics import PixelCounts, accuracy
from training.slide_data import SlideEntry, annotation_names, read_manifest

__all__ = ["SlideEvaluation", "eval_step", "evaluate_as_slides", "evaluate_slide_entries", "heatmap_at_pixels",
           "heatmap_on_grid", "main", "write_slide"]

logger = logging.getLogger(__name__)

TIFF_TILE = 256
MAX_EVAL_PIXELS = 16e6  # scoring grid of a slide's heatmap PxAP: every pixel up to this many, coarser beyond


def write_slide(image: np.ndarray, path: Path, mpp: float) -> Path:
    """Write an RGB image (H, W, 3) uint8 as a tiled, lossless TIFF whose resolution tags say `mpp` µm/px."""
    px_per_cm = 1e4 / mpp
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.ascontiguousarray(image), photometric="rgb", tile=(TIFF_TILE, TIFF_TILE),
                     compression="zlib", resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
    return path


def heatmap_at_pixels(heatmap_tif: Path, size_wh: tuple[int, int], hm_downsample: float) -> tuple[np.ndarray, np.ndarray]:
    """(probability (H, W) float32, analysed (H, W) bool) of every level-0 pixel, from the heatmap's level 0."""
    prob, covered = decode_heatmap(tifffile.imread(heatmap_tif, key=0))
    w, h = size_wh
    ys = np.minimum((np.arange(h) / hm_downsample).astype(np.int64), prob.shape[0] - 1)
    xs = np.minimum((np.arange(w) / hm_downsample).astype(np.int64), prob.shape[1] - 1)
    return prob[np.ix_(ys, xs)], covered[np.ix_(ys, xs)]


@dataclass
class SlideEvaluation:
    """The slide-path scores of one split and the per-image rows behind them."""

    accuracy: float
    pxap: float
    gland_pixels_not_analysed: float  # share of the mask's pixels the analysis left out
    rows: list[dict[str, Any]]
    options: dict[str, Any]
    wall_s: float
    protocol: str = ("each image written as a tiled TIFF at its source mpp, analysed by analyze_slide with these "
                     "options; unanalysed pixels score 0")

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "pxap": self.pxap, "n": len(self.rows),
                "gland_pixels_not_analysed": self.gland_pixels_not_analysed, "options": self.options,
                "protocol": self.protocol, "wall_s": self.wall_s,
                "images": self.rows}


def evaluate_as_slides(
    predictor: Predictor, records: list[Record], work_dir: Path, *, mpp: float = GLAS_MPP,
    options: AnalysisOptions | None = None, progress: bool = True,
) -> SlideEvaluation:
    """Write each record's image as a slide, analyse it, and score the slide class and the heatmap."""
    options = options or AnalysisOptions()
    names = predictor.metadata.class_names
    counts = PixelCounts.empty()
    rows: list[dict[str, Any]] = []
    missed = total = 0
    t0 = time.perf_counter()
    for record in tqdm(records, desc="slide path", disable=not progress):
        image = read_rgb(record.image_path)
        slide = write_slide(image, work_dir / "slides" / f"{record.name}.tif", mpp)
        result = analyze_slide(slide, predictor, work_dir / "out" / record.name, options)
        doc = result.result
        row: dict[str, Any] = {"name": record.name, "label": names[record.label], "predicted": result.label,
                               "probability": doc["classification"]["positive_probability"],
                               "tiles": doc["evidence"]["tiles_analysed"], "mpp_read": doc["provenance"]["slide"]["mpp_x"]}
        if record.mask_path is not None:
            mask = read_rgb(record.mask_path)[..., 0] > 127
            prob, covered = heatmap_at_pixels(result.path("heatmap"), (image.shape[1], image.shape[0]),
                                              float(doc["heatmap"]["hm_downsample"]))
            scores = np.where(covered, prob, 0.0)
            counts.add(scores, mask)
            missed += int((mask & ~covered).sum())
            total += int(mask.sum())
            one = PixelCounts.empty()
            one.add(scores, mask)
            row["pxap"] = one.pxap()
        rows.append(row)
    predicted = np.array([names.index(r["predicted"]) if r["predicted"] in names else -1 for r in rows])
    labels = np.array([names.index(r["label"]) for r in rows])
    return SlideEvaluation(
        accuracy=accuracy(predicted, labels) if rows else float("nan"),
        pxap=counts.pxap(),
        gland_pixels_not_analysed=missed / total if total else float("nan"),
        rows=rows, options=options.to_dict(), wall_s=round(time.perf_counter() - t0, 2),
    )


def heatmap_on_grid(heatmap_tif: Path, size_wh: tuple[int, int], hm_downsample: float, step: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(probability, analysed) at the centres of a grid of `step` level-0 pixels over the slide (step 1: every
    pixel, as `heatmap_at_pixels`)."""
    prob, covered = decode_heatmap(tifffile.imread(heatmap_tif, key=0))
    w, h = size_wh
    ys = np.minimum(((np.arange(h) + 0.5) * step / hm_downsample).astype(np.int64), prob.shape[0] - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * step / hm_downsample).astype(np.int64), prob.shape[1] - 1)
    return prob[np.ix_(ys, xs)], covered[np.ix_(ys, xs)]


def eval_step(l0_size_wh: tuple[int, int], max_pixels: float = MAX_EVAL_PIXELS) -> float:
    """Level-0 pixels per scoring-grid pixel: 1 (every pixel) up to `max_pixels`, coarser on large slides."""
    w, h = l0_size_wh
    return max(1.0, float(np.ceil(np.sqrt(w * h / max_pixels))))


def evaluate_slide_entries(
    predictor: Predictor, entries: list[SlideEntry], work_dir: Path, *, annotation_classes: tuple[str, ...],
    options: AnalysisOptions | None = None, progress: bool = True,
) -> SlideEvaluation:
    """Analyse each manifest slide as `pixelcam analyze` does (its mpp override applied) and score the slide class
    against its label and the heatmap against its annotations of `annotation_classes`.

    Pixels are scored on a grid of `eval_step` level-0 pixels (every pixel on slides up to 16 M pixels), each grid
    pixel in the annotation when its centre is; pixels the analysis left out score 0.
    """
    base = options or AnalysisOptions()
    names = predictor.metadata.class_names
    counts = PixelCounts.empty()
    rows: list[dict[str, Any]] = []
    missed = total = 0
    t0 = time.perf_counter()
    for entry in tqdm(entries, desc="slide path", disable=not progress):
        opts = dataclasses.replace(base, mpp_override=entry.mpp) if entry.mpp else base
        result = analyze_slide(entry.path, predictor, work_dir / "out" / entry.id, opts)
        doc = result.result
        row: dict[str, Any] = {"name": entry.id, "label": entry.label, "predicted": result.label,
                               "probability": doc["classification"]["positive_probability"],
                               "tiles": doc["evidence"]["tiles_analysed"], "mpp_read": doc["provenance"]["slide"]["mpp_x"]}
        if entry.annotations is not None:
            slide_doc = doc["provenance"]["slide"]
            size_wh = tuple(int(v) for v in slide_doc["l0_size_wh"])
            bounds = slide_doc.get("bounds")
            offset = (int(bounds[0]), int(bounds[1])) if bounds else (0, 0)
            step = eval_step(size_wh)
            grid_wh = (int(np.ceil(size_wh[0] / step)), int(np.ceil(size_wh[1] / step)))
            polys = select_classes(read_annotations(entry.annotations), annotation_classes)
            mask = rasterize(polys, (-offset[0], -offset[1]), 1.0 / step, grid_wh)
            prob, covered = heatmap_on_grid(result.path("heatmap"), grid_wh, float(doc["heatmap"]["hm_downsample"]),
                                            step)
            scores = np.where(covered, prob, 0.0)
            counts.add(scores, mask)
            missed += int((mask & ~covered).sum())
            total += int(mask.sum())
            one = PixelCounts.empty()
            one.add(scores, mask)
            row["pxap"] = one.pxap()
            row["eval_step_l0"] = step
        rows.append(row)
    predicted = np.array([names.index(r["predicted"]) if r["predicted"] in names else -1 for r in rows])
    labels = np.array([names.index(r["label"]) for r in rows])
    return SlideEvaluation(
        accuracy=accuracy(predicted, labels) if rows else float("nan"),
        pxap=counts.pxap() if total else float("nan"),
        gland_pixels_not_analysed=missed / total if total else float("nan"),
        rows=rows, options=base.to_dict(), wall_s=round(time.perf_counter() - t0, 2),
        protocol=("each slide analysed by analyze_slide with these options (its manifest mpp applied); heatmap "
                  "scored on a grid of eval_step_l0 level-0 pixels against the rasterised annotations; unanalysed "
                  "pixels score 0"),
    )


def _records(data_dir: Path, split: str, limit: int | None, splits_path: Path | None = None) -> list[Record]:
    records = load_glas(data_dir / "glas")
    if split in ("valcl", "valpx"):
        if splits_path is None:
            raise SystemExit(f"--split {split} needs --splits RUN_DIR/splits.json (the run's own split)")
        names = set(json.loads(splits_path.read_text())[split])
        records = [r for r in records if r.name in names]
    else:
        records = [r for r in records if (r.subset == "test") == (split == "test")]
    return records[:limit] if limit else records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.slide_eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="a pixelcam .onnx model")
    ap.add_argument("--split", choices=["test", "train", "valcl", "valpx", "all"], default="test",
                    help="GlaS testA/testB (default), train, or a run's valcl/valpx (with --splits)")
    ap.add_argument("--splits", type=Path, default=None, help="a run's splits.json, for --split valcl/valpx")
    ap.add_argument("--manifest", type=Path, default=None,
                    help="score the slides of a --dataset slides manifest instead (those of --split, by the "
                         "manifest's split column; every slide with --split all)")
    ap.add_argument("--data-dir", type=Path, default=None, help="the folder holding glas/ (PIXELCAM_DATA_DIR)")
    ap.add_argument("--out", type=Path, default=None, help="folder for report.json (and the slides with --keep)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images")
    ap.add_argument("--threads", type=int, default=None, help="model threads (default: all cores)")
    ap.add_argument("--inference", choices=["auto", "dense", "tiles"], default="auto")
    ap.add_argument("--keep", action="store_true", help="keep the written slides and analyses under --out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.split == "all" and args.manifest is None:
        ap.error("--split all is for --manifest (every slide of it)")
    predictor = Predictor(args.model, threads=args.threads)
    out = args.out or Path.cwd() / "slide_eval"
    out.mkdir(parents=True, exist_ok=True)
    options = AnalysisOptions(inference=args.inference)
    with tempfile.TemporaryDirectory(prefix="pixelcam-slide-eval-") as tmp:
        work = out / "work" if args.keep else Path(tmp)
        if args.manifest is not None:
            meta = predictor.metadata
            entries = [e for e in read_manifest(args.manifest, tuple(meta.class_names))
                       if args.split == "all" or (e.split or "train") == args.split][: args.limit]
            result = evaluate_slide_entries(predictor, entries, work, options=options,
                                            annotation_classes=annotation_names(meta.foreground_name,
                                                                                meta.positive_class))
        else:
            records = _records(args.data_dir or default_data_dir(), args.split, args.limit, args.splits)
            result = evaluate_as_slides(predictor, records, work, options=options)
    report = {"model": str(args.model.name), "model_sha256": predictor.sha256, "split": args.split,
              **result.to_dict()}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{len(result.rows)} {args.split} images as slides: accuracy {result.accuracy:.1f} %, "  # noqa: T201
          f"PxAP {result.pxap:.2f} %, gland pixels not analysed {100 * result.gland_pixels_not_analysed:.1f} % "
          f"({result.wall_s:.0f} s); report: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
