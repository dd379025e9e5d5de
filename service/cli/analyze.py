"""`pixelcam analyze`: one slide analysed in this process, no server; its flags, progress bar and exit codes.

Exit codes: 0 done, 1 unexpected error, 2 usage, 3 slide refused, 4 slide has no usable MPP (pass `--mpp`),
5 model refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

import model
from model.errors import InvalidModelError
from service import constants
from service.slide.errors import MissingMppError, SlideError

__all__ = [
    "DEFAULT_MODEL_NAME",
    "EXIT_MODEL",
    "EXIT_MPP",
    "EXIT_OK",
    "EXIT_SLIDE",
    "EXIT_UNEXPECTED",
    "EXIT_USAGE",
    "UsageError",
    "add_analyze_parser",
    "analyze_command",
    "default_model_path",
    "options_from_args",
]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_SLIDE, EXIT_MPP, EXIT_MODEL = 0, 1, 2, 3, 4, 5
SLIDE_HEATMAP = "heatmap-slide.tif"  # what the shipped QuPath script looks for beside result.geojson
DEFAULT_MODEL_NAME = f"{constants.DEMO_MODEL_NAME}.onnx"


class UsageError(Exception):
    """A command line that cannot run as given."""


def default_model_path() -> Path:
    """The demo model shipped inside the installed `model` package (model/weights/)."""
    return Path(model.__file__).resolve().parent / "weights" / DEFAULT_MODEL_NAME


def add_analyze_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `pixelcam analyze`."""
    p = subparsers.add_parser(
        "analyze",
        help="analyse one slide in this process: class, heatmap, overlay and QuPath GeoJSON",
        description="Writes result.json, heatmap.tif, overlay.png and result.geojson into --out. "
        "Exit codes: 0 done, 1 unexpected, 2 usage, 3 slide refused, 4 no usable MPP, 5 model refused.",
    )
    p.add_argument(
        "slide", help="the slide file (SVS, NDPI, MRXS, DICOM, TIFF, ...) or an fsspec URL (s3://...)"
    )
    p.add_argument(
        "--model", type=Path, help=f"a pixelcam .onnx model (default: the demo {DEFAULT_MODEL_NAME})"
    )
    p.add_argument(
        "--mpp", type=float, help="microns per level-0 pixel, overriding (or supplying) the slide's"
    )
    p.add_argument("--out", type=Path, help="output folder (default: ./<slide name>.pixelcam)")
    p.add_argument("--batch-size", type=int, default=16, help="tiles per model call (default 16)")
    p.add_argument("--threads", type=int, help="model threads (default: all cores)")
    p.add_argument("--reader-threads", type=int, default=2, help="tile decoding threads (default 2)")
    p.add_argument(
        "--reader-processes",
        type=int,
        default=0,
        help="decode TIFF tiles in N processes (many cores and a GPU; default 0: threads)",
    )
    p.add_argument("--min-tissue", type=float, default=0.1, help="keep tiles with this tissue fraction (0.1)")
    p.add_argument("--overlap", type=float, default=0.0, help="tile overlap fraction in [0, 1) (default 0)")
    p.add_argument(
        "--blend",
        choices=["mean", "cosine"],
        default="mean",
        help="how overlapping tiles are averaged (mean)",
    )
    p.add_argument(
        "--hm-downsample", type=float, help="level-0 pixels per heatmap cell (default: model cell)"
    )
    p.add_argument(
        "--inference",
        choices=["auto", "dense", "tiles"],
        help="dense: regions of tiles with a context halo, cores edge to edge, no seams (format_version 2 "
        "models, overlap 0); tiles: each tile alone; auto (default): dense when the model and overlap allow",
    )
    # no defaults here: AnalysisOptions holds them (one definition), and only given flags are passed on
    p.add_argument("--region-tiles", type=int, help="dense: tiles per region side")
    p.add_argument("--halo", type=int, help="dense: context margin around a region, in model-input px")
    p.add_argument("--no-detections", action="store_true", help="leave the tile objects out of the GeoJSON")
    p.add_argument("--raw-heatmap", action="store_true",
                   help="keep the model's foreground on glass too (default: cells off the tissue mask are 0)")
    p.add_argument("--gzip", action="store_true", help="write result.geojson.gz")
    p.add_argument("--slide-heatmap", nargs="?", const="turbo", default=None, metavar="COLORMAP",
                   help="also write heatmap-slide.tif, the heatmap in the slide's level-0 frame for QuPath (the "
                        "shipped script) and ASAP: a colour map (default turbo) or 'likelihood'")
    p.add_argument("--report", action="store_true",
                   help="also write report.html: one self-contained page a pathologist can read (docs/analysis.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=analyze_command)


def options_from_args(args: argparse.Namespace) -> Any:
    """AnalysisOptions from the flags; a bad value is a usage error."""
    from service.analysis.plan import AnalysisOptions  # heavy (onnxruntime, OpenCV): see service.cli.main

    try:
        return AnalysisOptions(
            mpp_override=args.mpp,
            min_tissue=args.min_tissue,
            overlap=args.overlap,
            blend=args.blend,
            batch_size=args.batch_size,
            hm_downsample=args.hm_downsample,
            reader_threads=args.reader_threads,
            reader_processes=args.reader_processes,
            write_detections=not args.no_detections,
            tissue_only=not args.raw_heatmap,
            geojson_gzip=args.gzip,
            **{name: value for name, value in (("inference", args.inference), ("region_tiles", args.region_tiles),
                                               ("halo_px", args.halo)) if value is not None},
        )
    except ValueError as err:
        raise UsageError(str(err)) from err


def _model_path(args: argparse.Namespace) -> Path:
    if args.model is not None:
        return Path(args.model)
    path = default_model_path()
    if not path.is_file():
        raise UsageError(
            f"the demo model {path} is not installed; pass a model with --model M.onnx "
            "(for a test run: python -m model.export --random M.onnx)"
        )
    return path


class _Bar:
    """A tqdm progress bar fed by the pipeline's progress callback (tiles, tiles/s, ETA)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, progress: Any) -> None:
        if not self.enabled or progress.total == 0:
            return
        if self.bar is None:
            self.bar = tqdm(total=progress.total, unit="tile", desc="analyse", dynamic_ncols=True)
        self.bar.update(progress.done - self.bar.n)
        if progress.done >= progress.total:  # stop the clock: stitching is not tile throughput
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.enabled = False


def _slide_name(slide: str) -> str:
    """The last path component of a slide path or URL."""
    return slide.rstrip("/").rsplit("/", 1)[-1]


def _run_analysis(args: argparse.Namespace) -> Any:
    """Load the model, analyse the slide, return the AnalysisResult (exceptions say what went wrong)."""
    # heavy (onnxruntime, OpenCV): imported when an analysis runs, not for `pixelcam --help`
    from model.runtime import Predictor
    from service.analysis.pipeline import analyze_slide
    from service.analysis.plan import InvalidOptionsError

    options = options_from_args(args)
    remote = "://" in args.slide
    slide: str | Path = args.slide if remote else Path(args.slide)
    if not remote and not Path(slide).exists():
        raise UsageError(f"no such slide: {args.slide}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    out = args.out or Path.cwd() / f"{_slide_name(args.slide)}.pixelcam"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder (it is created if missing) for the results")
    model_path = _model_path(args)
    predictor = Predictor(model_path, threads=args.threads)
    if args.slide_heatmap is not None:
        # heavy (OpenCV, tifffile): imported when asked for, as the analysis imports above
        from service.outputs.deepzoom import COLORMAPS
        from service.outputs.slide_frame import LIKELIHOOD

        if args.slide_heatmap not in (*COLORMAPS, LIKELIHOOD):
            raise UsageError(f"--slide-heatmap must be {LIKELIHOOD!r} or one of {', '.join(COLORMAPS)}, got "
                             f"{args.slide_heatmap!r}")
    bar = _Bar(enabled=not args.quiet)
    try:
        result = analyze_slide(slide, predictor, out, options, progress=bar)
    except InvalidOptionsError as err:  # options that cannot work together, or not with this model
        raise UsageError(str(err)) from err
    finally:
        bar.close()
    if args.slide_heatmap is not None and result.result["classification"]["label"] is not None:
        from service.outputs.slide_frame import write_slide_frame_heatmap  # heavy: as above

        hm = result.result["heatmap"]
        write_slide_frame_heatmap(result.path("heatmap"), result.out_dir / SLIDE_HEATMAP,
                                  l0_size_wh=tuple(hm["l0_size_wh"]), hm_downsample=float(hm["hm_downsample"]),
                                  l0_mpp=float(result.result["provenance"]["slide"]["mpp_x"]),
                                  colormap=args.slide_heatmap)
    if args.report:
        from service.analysis.html_report import write_html_report  # heavy: as above

        write_html_report(result.out_dir, slide, mpp_override=args.mpp)
    return result


def analyze_command(args: argparse.Namespace) -> int:
    """`pixelcam analyze`: run, print a one-line summary, map failures to exit codes."""
    try:
        result = _run_analysis(args)
    except UsageError as err:
        logger.error("%s", err)
        return EXIT_USAGE
    except MissingMppError as err:
        logger.error("%s", err)
        return EXIT_MPP
    except SlideError as err:
        logger.error("slide refused: %s", err)
        return EXIT_SLIDE
    except (InvalidModelError, FileNotFoundError) as err:
        logger.error("model refused: %s", err)
        return EXIT_MODEL
    except Exception as err:  # the entry point's last resort: say what happened, exit non-zero
        logger.error(
            "analysis failed unexpectedly: %s: %s (run with --log-level DEBUG for the trace)",
            type(err).__name__,
            err,
        )
        logger.debug("traceback", exc_info=True)
        return EXIT_UNEXPECTED
    doc = result.result
    call, evidence = doc["classification"], doc["evidence"]
    if call["label"] is None:
        summary = f"{_slide_name(args.slide)}: {doc['message']}"
    else:
        summary = (
            f"{_slide_name(args.slide)}: {call['label']} (p = {call['probability']:.3f}), "
            f"{evidence['tiles_analysed']} tiles, positive area {evidence['positive_area_mm2']:.3f} mm2 "
            f"({evidence['positive_fraction_of_tissue']:.1%} of tissue)"
        )
    sys.stdout.write(f"{summary}\nresults in {result.out_dir}{os.sep}\n")
    return EXIT_OK
