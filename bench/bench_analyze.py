"""Whole-slide analysis benchmark: the PERFORMANCE.md ratios from one run on generated slides.

Usage: ``python bench/bench_analyze.py [--width 16000 --height 16000] [--threads N] [--json OUT.json]``

Prints and writes as JSON, all measured in this one run on one generated slide:

- pipeline efficiency: ``analyze_slide`` tissue tiles/s (warm) / the same ONNX model alone on pre-decoded uint8
  batches, same predictor threads; the median over analyses, each against the model-alone runs around it;
- reading ratio: the pipeline's read + decode + resize path with a no-op model / OpenSlide ``read_region``
  (+ RGBA->RGB + the same resize) on the same tiles with the same number of threads;
- the ratio against the naive loop: OpenSlide ``read_region`` + torch eager, batch 1, the same network weights
  (a subset of tiles);
- peak RSS of an analysis of this slide and of one with 4x the tissue (each in a fresh process), and their ratio;
- CPU-seconds per tile for each, thread counts, cold (fresh process) vs warm, and the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH_DATA,
    BENCH_OUT,
    REPO_ROOT,
    BenchError,
    clocked,
    machine_info,
    peak_rss_mib,
    ru_maxrss_mib,
    run_child,
)
from _measure import (  # noqa: E402
    NoopPredictor,
    measure_analysis,
    measure_model_alone,
    measure_model_alone_dense,
    measure_naive,
    measure_openslide_reading,
    measure_pipeline_reading,
    plan_for,
    predecoded_regions,
    predecoded_tiles,
)
from _summary import goals_for, print_summary  # noqa: E402
from make_slide import SlideSpec, write_slide  # noqa: E402

logger = logging.getLogger("bench_analyze")

DEMO_MODEL = REPO_ROOT / "model" / "weights" / "pixelcam-glas-resnet18.onnx"
# The training run that exports the demo model (docs/training.md); the parity check below proves the match.
DEMO_CHECKPOINT = REPO_ROOT / "runs" / "glas_demo" / "pixelcam" / "best_localization.pt"


def ensure_slide(width: int, height: int, fraction: float, seed: int) -> Path:
    """Generate the benchmark slide once (cached under bench/_data/ by its parameters)."""
    path = BENCH_DATA / f"bench-{width}x{height}-f{fraction:g}-s{seed}.svs"
    if not path.is_file():
        logger.info("generating %s", path.name)
        write_slide(path, SlideSpec((width, height), fraction, 0.5, 256, 80, "svs", seed))
    return path


def ensure_model(args: argparse.Namespace) -> tuple[Path, Any, str]:
    """The ONNX model to measure, a torch model with the same weights for the naive loop, and a note."""
    from model.checkpoint import load_checkpoint, save_checkpoint

    if args.model is not None or (DEMO_MODEL.is_file() and not args.random_model):
        onnx_path = args.model or DEMO_MODEL
        ckpt = args.checkpoint or (
            DEMO_CHECKPOINT if DEMO_CHECKPOINT.is_file() and args.model is None else None
        )
        if ckpt is not None:
            torch_model, _, _ = load_checkpoint(ckpt)
            shown = ckpt.resolve().relative_to(REPO_ROOT) if ckpt.resolve().is_relative_to(REPO_ROOT) else ckpt
            return onnx_path, torch_model, f"{onnx_path.name} + checkpoint {shown}"
        logger.warning(
            "no --checkpoint for %s: the naive loop uses random weights of the same architecture",
            onnx_path.name,
        )
        torch_model, _ = _random_model(args.seed, args.random_encoder, args.random_width)
        return onnx_path, torch_model, f"{onnx_path.name}; naive loop: same architecture, random weights"
    arch = f"{args.random_encoder}-w{args.random_width:g}-os8"
    onnx_path = BENCH_OUT / f"random-{arch}-s{args.seed}.onnx"
    ckpt = onnx_path.with_suffix(".pt")
    if onnx_path.is_file() and ckpt.is_file():
        torch_model, _, _ = load_checkpoint(ckpt)
    else:
        from model.export import export_onnx

        torch_model, cfg = _random_model(args.seed, args.random_encoder, args.random_width)
        save_checkpoint(ckpt, torch_model, cfg)
        export_onnx(torch_model, cfg, onnx_path, provenance={"dataset": "none (random initialisation)"})
    return onnx_path, torch_model, f"{onnx_path.name} (random init, seed {args.seed}) and its checkpoint"


def ensure_int8(onnx_path: Path) -> Path:
    """The int8 QDQ version of ``onnx_path`` (made once, cached beside the bench outputs), as model.quantize's
    README command makes it: calibrated on 2 crops of each GlaS training image."""
    import hashlib

    from make_slide import shared_data_dir

    from model.quantize import main as quantize_main

    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()[:12]  # a retrained model gets its own int8
    dst = BENCH_OUT / f"{onnx_path.stem}-{digest}-int8.onnx"
    if not dst.is_file():
        glas = shared_data_dir() / "glas" / "images"
        argv = [str(onnx_path), str(dst), "--calibration-dir", str(glas), "--pattern", "train_*.png"]
        if quantize_main([*argv, "--source-mpp", "0.62005"]) != 0:
            raise BenchError(f"quantising {onnx_path.name} failed")
    return dst


def _random_model(seed: int, encoder: str = "resnet18", width: float = 0.5) -> tuple[Any, Any]:
    """``encoder`` at ``width`` (default: the demo's resnet18 x0.5), output stride 8, input_mpp 1.0, random."""
    import torch

    from model.config import ModelConfig
    from model.network import build_model

    torch.manual_seed(seed)
    cfg = ModelConfig(encoder_name=encoder, encoder_width=width, output_stride=8, input_mpp=1.0)
    return build_model(cfg).eval(), cfg


def child_analyze(slide: Path, model: Path, threads: int, out_dir: Path) -> int:
    """Fresh-process analysis for peak RSS and the cold numbers; prints one JSON line."""
    from model.runtime import Predictor
    from service.analysis.pipeline import analyze_slide
    from service.analysis.plan import AnalysisOptions

    rss_before_mib = peak_rss_mib()
    with clocked() as load:
        predictor = Predictor(model, threads=threads)
    with clocked() as run:
        analyze_slide(slide, predictor, out_dir, AnalysisOptions())
    report = {
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "ru_maxrss_mib": round(ru_maxrss_mib(), 1),
        "peak_rss_after_imports_mib": round(rss_before_mib, 1),
        "session_load": load.rate(1),
        "analysis_wall_s": round(run.wall_s, 3),
        "analysis_cpu_s": round(run.cpu_s, 3),
    }
    print(json.dumps(report))
    return 0


def measured_predictor(args: argparse.Namespace, onnx_path: Path, torch_model: Any, fp32: Any) -> tuple[Any, Path]:
    """The predictor the analyses run (fp32 ONNX, its int8 version, or the torch backend) and its ONNX file."""
    from model.runtime import Predictor

    path, predictor = onnx_path, fp32
    if args.int8:
        path = ensure_int8(onnx_path)
        predictor = Predictor(path, threads=args.threads)
    if args.backend == "torch":
        from _torch_backend import TorchPredictor

        predictor = TorchPredictor(torch_model, predictor, args.device, half=args.bf16)
    return predictor, path


def describe_backend(predictor: Any) -> dict[str, Any]:
    """The runtime and device behind a predictor, for the JSON."""
    if hasattr(predictor, "describe"):
        return dict(predictor.describe())
    return {"backend": "onnxruntime", "providers": predictor.providers}


def _analysis_options(args: argparse.Namespace) -> Any:
    from service.analysis.plan import AnalysisOptions

    return AnalysisOptions(
        batch_size=args.batch_size,
        reader_threads=args.reader_threads or args.threads,
        reader_processes=args.reader_processes,
        inference=args.inference,
    )


def child_stream(args: argparse.Namespace) -> int:
    """One of --streams concurrent analysers: warm up, wait for the common start, analyse, report times."""
    from model.runtime import Predictor
    from service.analysis.pipeline import analyze_slide

    onnx_path, torch_model, _ = ensure_model(args)
    predictor, _ = measured_predictor(args, onnx_path, torch_model, Predictor(onnx_path, threads=args.threads))
    options = _analysis_options(args)
    out = Path(tempfile.mkdtemp(prefix="stream-", dir=BENCH_OUT))
    analyze_slide(args.child_stream, predictor, out / "warm", options)  # untimed: pools, kernels, caches
    time.sleep(max(0.0, args.start_at - time.time()))
    t0, tiles = time.time(), 0
    for k in range(args.repeats):
        result = analyze_slide(args.child_stream, predictor, out / f"run-{k}", options)
        tiles += int(result.result["evidence"]["tiles_analysed"])
    print(json.dumps({"start": t0, "end": time.time(), "tiles": tiles, "analyses": args.repeats}))
    return 0


def measure_streams(args: argparse.Namespace, n_tiles: int, model_per_s: float) -> dict[str, Any]:
    """--streams processes analysing the slide at once (as several workers sharing one GPU would): the
    aggregate tiles/s over the window in which all ran, against the model alone in one process."""
    import subprocess

    start_at = time.time() + args.stream_warmup_s
    argv = list(args.argv) + ["--child-stream", str(ensure_slide(args.width, args.height,
                                                                          args.tissue_fraction, args.seed)),
                                        "--start-at", str(start_at)]
    procs = [
        subprocess.Popen([sys.executable, "bench/bench_analyze.py", *argv], cwd=REPO_ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(args.streams)
    ]
    reports = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=3600)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise BenchError(f"a stream process failed ({proc.returncode}); rerun it alone to see why")
        reports.append(json.loads(lines[-1]))
    if min(r["start"] for r in reports) < start_at - 1.0:
        raise BenchError("a stream started before the others were ready; raise --stream-warmup-s")
    late = max(r["start"] for r in reports) - start_at
    window = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    tiles = sum(r["tiles"] for r in reports)
    return {
        "streams": args.streams,
        "analyses_each": args.repeats,
        "tiles_per_analysis": n_tiles,
        "tiles": tiles,
        "window_s": round(window, 3),
        "late_start_s": round(late, 3),
        "per_s": round(tiles / window, 3),
        "efficiency": _ratio(tiles / window, model_per_s),
        "each": reports,
    }


def _ratio(num: float, den: float) -> float:
    return round(num / den, 3) if den > 0 else float("nan")


def _check_weights(results: dict[str, Any], torch_model: Any, onnx_path: Path, tiles: Any) -> None:
    """Record whether the naive loop's torch weights are the ONNX's (parity of both outputs on real tiles)."""
    from model.errors import ParityError
    from model.export import check_parity

    if "random weights" in results["model"]["note"]:
        return
    try:
        parity: dict[str, Any] = check_parity(torch_model, onnx_path, tiles[:2], atol=1e-3)
    except ParityError as err:
        parity = {"failed": str(err)}
        results["model"]["note"] += "; naive loop: torch weights differ from the ONNX (parity failed)"
    results["model"]["parity_torch_vs_onnx"] = parity


def _measure_efficiency(
    predictor: Any, slide: Path, plan: Any, tiles: Any, work: Path, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model-alone runs and analyses in alternation; each analysis against the model runs around it."""
    options = plan.options
    batch = int(options.batch_size)
    n_model = min(len(plan), args.model_tiles)
    if plan.region_plan is not None:  # dense: the model alone on the plan's own regions (all, up to 64)
        regions, counts = predecoded_regions(slide, plan, 64)
        n_dense = sum(counts)  # one pass over them: the same work per tile as the analysis when all fit

        def model_alone() -> dict[str, Any]:
            return measure_model_alone_dense(predictor, regions, counts, n_dense)
    else:
        def model_alone() -> dict[str, Any]:
            return measure_model_alone(predictor, tiles, n_model, batch)
    model_runs = [model_alone()]
    analysis_runs: list[dict[str, Any]] = []
    for k in range(args.repeats):
        analysis_runs.append(measure_analysis(slide, predictor, work / f"run-warm-{k}", len(plan), options))
        model_runs.append(model_alone())
    model = {
        "batch": batch if plan.region_plan is None else "one region per call",
        "inference": "tiles" if plan.region_plan is None else {"dense": plan.regions},
        "runs": model_runs,
        "mean_per_s": round(statistics.mean(m["per_s"] for m in model_runs), 3),
        "mean_cpu_s_per_tile": round(statistics.mean(m["cpu_s_per_item"] for m in model_runs), 5),
    }
    analysis = {
        "warm": {
            **analysis_runs[0],
            "per_s": round(statistics.mean(a["per_s"] for a in analysis_runs), 3),
            "cpu_s_per_item": round(statistics.mean(a["cpu_s_per_item"] for a in analysis_runs), 5),
        },
        "runs": analysis_runs,
        "pair_efficiencies": [
            _ratio(a["per_s"], (model_runs[k]["per_s"] + model_runs[k + 1]["per_s"]) / 2)
            for k, a in enumerate(analysis_runs)
        ],
        "in_model_shares": [
            _ratio(float(a["phases_s"].get("chunks_infer", 0.0)), a["wall_s"]) for a in analysis_runs
        ],
        # the tile phase alone (read + decode + infer, no planning or finalisation) against the model alone
        "tile_phase_efficiencies": [
            _ratio(
                _ratio(len(plan), float(a["phases_s"].get("chunks_wall", 0.0))),
                (model_runs[k]["per_s"] + model_runs[k + 1]["per_s"]) / 2,
            )
            for k, a in enumerate(analysis_runs)
        ],
        "reader_threads": int(options.reader_threads),
    }
    return model, analysis


def _ratios(res: dict[str, Any]) -> dict[str, float]:
    """The goal ratios, each by wall-clock rate and by CPU seconds per tile."""
    warm, model, naive = res["analysis"]["warm"], res["model_alone"], res["naive"]
    pipe, osl = res["reading"]["pipeline_noop_model"], res["reading"]["openslide_read_region"]
    ratios = {
        "pipeline_efficiency": round(statistics.median(res["analysis"]["pair_efficiencies"]), 3),
        "pipeline_efficiency_cpu": _ratio(model["mean_cpu_s_per_tile"], warm["cpu_s_per_item"]),
        "in_model_share": round(statistics.median(res["analysis"]["in_model_shares"]), 3),
        "tile_phase_efficiency": round(statistics.median(res["analysis"]["tile_phase_efficiencies"]), 3),
        "reading_ratio": _ratio(pipe["per_s"], osl["per_s"]),
        "reading_ratio_cpu": _ratio(osl["cpu_s_per_item"], pipe["cpu_s_per_item"]),
        "naive_ratio": _ratio(warm["per_s"], naive["per_s"]),
        "naive_ratio_cpu": _ratio(naive["cpu_s_per_item"], warm["cpu_s_per_item"]),
    }
    if "naive_1_thread" in res:
        ratios["naive_1_thread_ratio_cpu"] = _ratio(
            res["naive_1_thread"]["cpu_s_per_item"], warm["cpu_s_per_item"]
        )
    if "rss" in res:
        ratios["rss_ratio_4x"] = res["rss"]["ratio"]
    return ratios


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, in one process (plus two children for RSS), on one generated slide."""
    from model.runtime import Predictor

    threads = args.threads
    options = _analysis_options(args)
    results: dict[str, Any] = {"machine": machine_info(), "threads": {"predictor_intra_op": threads}}
    small = ensure_slide(args.width, args.height, args.tissue_fraction, args.seed)
    # the 4x slide only serves the RSS comparison; generating it is the slowest step on a fresh machine
    large = None if args.skip_rss else ensure_slide(2 * args.width, 2 * args.height, args.tissue_fraction, args.seed)
    onnx_path, torch_model, model_note = ensure_model(args)
    shown = onnx_path.relative_to(REPO_ROOT) if onnx_path.is_relative_to(REPO_ROOT) else onnx_path
    predictor = Predictor(onnx_path, threads=threads)
    results["model"] = {"path": str(shown), "note": model_note, "sha256": predictor.sha256}
    in_side = predictor.input_size
    work = Path(tempfile.mkdtemp(prefix="pixelcam-bench-", dir=BENCH_OUT))
    plan = plan_for(small, predictor, work / "job-small", options)
    n_small = len(plan)
    n_large = 0 if large is None else len(plan_for(large, predictor, work / "job-large", options))
    results["slides"] = {
        "small": {
            "path": small.name,
            "tissue_tiles": n_small,
            "lvl_tile_size": int(plan.tiles.lvl_tile_size),
            "level": int(plan.tiles.level),
            "input_size": in_side,
        },
        "large": None if large is None else {"path": large.name, "tissue_tiles": n_large},
    }
    logger.info("small slide: %d tissue tiles; large: %d", n_small, n_large)
    tiles = predecoded_tiles(small, plan, in_side, max(128, 2 * options.batch_size))
    _check_weights(results, torch_model, onnx_path, tiles)
    predictor, measured_path = measured_predictor(args, onnx_path, torch_model, predictor)
    if args.int8:
        results["model"]["int8"] = {
            "path": measured_path.name,
            "sha256": predictor.sha256,
            "note": "the pipeline runs this int8 QDQ artefact (model.quantize, GlaS train calibration); the "
            "model-alone runs too; the naive loop runs the fp32 torch weights it was quantised from",
        }
    results["backend"] = describe_backend(predictor)
    if args.streams > 1:
        model_run = measure_model_alone(predictor, tiles, min(len(plan), args.model_tiles), options.batch_size)
        results["model_alone"] = {**model_run, "batch": options.batch_size}
        results["streams"] = measure_streams(args, n_small, model_run["per_s"])
        results["machine"]["loadavg_at_end"] = list(os.getloadavg())
        return results
    # The reading paths first (they also warm the page cache), then the model alone and the analysis in
    # alternation, so load drift on a shared machine hits both sides of each efficiency ratio alike.
    results["reading"] = {
        "pipeline_noop_model": measure_pipeline_reading(small, plan, NoopPredictor(predictor)),
        "openslide_read_region": measure_openslide_reading(small, plan, in_side, threads),
        "openslide_threads": threads,
    }
    results["model_alone"], results["analysis"] = _measure_efficiency(
        predictor, small, plan, tiles, work, args
    )
    naive_device = args.device if args.backend == "torch" else "cpu"
    results["naive"] = {
        **measure_naive(small, plan, torch_model, args.naive_tiles, threads, naive_device),
        "torch_threads": threads,
        "device": naive_device,
    }
    if naive_device == "cpu":
        # Per core: torch's OpenMP threads at batch 1 scale badly on a busy machine; one thread shows the cost
        # without that effect, so the ratio's two causes (runtime, threading) can be told apart.
        results["naive_1_thread"] = measure_naive(small, plan, torch_model, max(8, args.naive_tiles // 2), 1)
    if large is not None:
        results["rss"] = measure_rss(small, large, measured_path, threads, work, n_small, n_large)
    results["ratios"] = _ratios(results)
    results["goals"] = goals_for(results["backend"])
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    return results


def measure_rss(
    small: Path, large: Path, model: Path, threads: int, work: Path, n_small: int, n_large: int
) -> dict[str, Any]:
    """Peak RSS of one analysis of each slide, each in a fresh process."""
    runs = {}
    for name, slide, n in (("small", small, n_small), ("large_4x_tissue", large, n_large)):
        report = run_child(
            [
                "bench/bench_analyze.py",
                "--child-analyze",
                str(slide),
                "--model",
                str(model),
                "--threads",
                str(threads),
                "--child-out",
                str(work / f"child-{name}"),
            ],
            timeout_s=3600,
        )
        report["tissue_tiles"] = n
        report["cold_tiles_per_s"] = _ratio(n, report["analysis_wall_s"])
        report["cpu_s_per_tile"] = round(report["analysis_cpu_s"] / n, 5)
        runs[name] = report
    runs["ratio"] = _ratio(runs["large_4x_tissue"]["peak_rss_mib"], runs["small"]["peak_rss_mib"])
    return runs


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--width", type=int, default=16000, help="small slide width (the large one is 2x each side)"
    )
    ap.add_argument("--height", type=int, default=16000)
    ap.add_argument("--tissue-fraction", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="predictor/reader threads"
    )
    ap.add_argument(
        "--model", type=Path, default=None, help="ONNX model (default: the demo model, else random)"
    )
    ap.add_argument("--checkpoint", type=Path, default=None, help="checkpoint with the --model's weights")
    ap.add_argument("--random-model", action="store_true", help="use a random model even if the demo exists")
    ap.add_argument(
        "--random-encoder",
        default="resnet18",
        choices=("resnet18", "resnet34", "resnet50"),
        help="--random-model's encoder; resnet50 at width 1 is the paper's (38.2 GFLOP per 224 px tile at output "
        "stride 8, 8x the demo model's 4.7)",
    )
    ap.add_argument("--random-width", type=float, default=0.5, help="--random-model's encoder width multiplier")
    ap.add_argument("--model-tiles", type=int, default=256, help="tiles for the model-alone measurement")
    ap.add_argument("--naive-tiles", type=int, default=48, help="tiles for the naive loop")
    ap.add_argument("--repeats", type=int, default=2, help="analyses, each bracketed by model-alone runs")
    ap.add_argument("--batch-size", type=int, default=16, help="analysis and model-alone batch size")
    ap.add_argument("--reader-threads", type=int, default=None, help="pipeline reader threads (default --threads)")
    ap.add_argument("--reader-processes", type=int, default=0, help="pipeline reader processes (default 0: threads)")
    ap.add_argument("--inference", choices=["auto", "dense", "tiles"], default="auto",
                    help="the analysis option of that name (default auto: dense for a format_version 2 model)")
    ap.add_argument(
        "--backend",
        choices=("onnx", "torch"),
        default="onnx",
        help="onnx: onnxruntime (the service's runtime); torch: the same weights in torch on --device, for "
        "GPU machines without onnxruntime-gpu",
    )
    ap.add_argument("--device", default="cuda", help="torch device for --backend torch (naive loop too)")
    ap.add_argument("--bf16", action="store_true", help="--backend torch: bf16 autocast")
    ap.add_argument(
        "--int8",
        action="store_true",
        help="onnx backend: analyse with the model's int8 QDQ version (python -m model.quantize); the naive "
        "loop keeps the fp32 torch weights",
    )
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="where to write the JSON (default bench/_out/)")
    ap.add_argument(
        "--streams",
        type=int,
        default=1,
        help="N > 1: only the model alone, then N processes analysing the slide --repeats times each at once "
        "(several workers sharing one GPU); prints their aggregate tiles/s against the model alone",
    )
    ap.add_argument("--stream-warmup-s", type=float, default=60.0, help="--streams: time to load and warm up")
    ap.add_argument("--child-stream", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--child-analyze", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --streams passes on to its processes
    if args.int8 and args.backend != "onnx":
        ap.error("--int8 quantises the ONNX model: use it with --backend onnx")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.child_analyze is not None:
        return child_analyze(args.child_analyze, args.model, args.threads, args.child_out)
    if args.child_stream is not None:
        return child_stream(args)
    BENCH_OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        results = run_benchmark(args)
    except BenchError as err:
        logger.error("%s", err)
        return 2
    results["bench_wall_s"] = round(time.perf_counter() - started, 1)
    out = args.json or BENCH_OUT / f"bench_analyze-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    if "streams" in results:
        st = results["streams"]
        print(
            f"{st['streams']} concurrent analysers x {st['analyses_each']} analyses of {st['tiles_per_analysis']} "
            f"tiles: {st['per_s']:.1f} tiles/s over {st['window_s']:.2f} s (starts {st['late_start_s']:.2f} s "
            f"apart); model alone {results['model_alone']['per_s']:.1f} tiles/s; efficiency {st['efficiency']:.3f}"
        )
    else:
        print_summary(results)
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
