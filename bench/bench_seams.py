"""Seam score and analysis time of one slide under each way of computing the heatmap, in one run.

Analyses the slide with `analyze_slide` in each mode (default: dense, the default; tiles; tiles with
`--overlap 0.5 --blend cosine`), decodes heatmap.tif and prints the seam score (`service.outputs.seams`: the
largest folded mean step between neighbouring analysed cells over the median one, at the model window; 1.0 = no
seam) with the wall time and the model time of each. Modes run in the order given, `--repeats` times in
alternation, so load drift hits all of them alike.

    .venv/bin/python bench/bench_seams.py [SLIDE] [--mpp 0.5] [--model M.onnx] [--threads 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_OUT, REPO_ROOT, clocked, machine_info  # noqa: E402
from make_slide import shared_data_dir  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))
from model.runtime import Predictor  # noqa: E402
from service.analysis.pipeline import analyze_slide  # noqa: E402
from service.analysis.plan import AnalysisOptions  # noqa: E402
from service.outputs.seams import seam_score  # noqa: E402
from service.outputs.stitching import decode_heatmap  # noqa: E402

logger = logging.getLogger("bench_seams")

MODES: dict[str, dict[str, Any]] = {
    "dense": {},  # the default options
    "tiles": {"inference": "tiles"},
    "overlap-cosine": {"overlap": 0.5, "blend": "cosine"},
    "dense-r4": {"region_tiles": 4},  # smaller dense regions: less tissue-free area, more halo
    "dense-r2": {"region_tiles": 2},
}


def measure(slide: Path, predictor: Predictor, options: AnalysisOptions, out: Path) -> dict[str, Any]:
    """One analysis: its seam score, wall time, model time and tile count."""
    with clocked() as clock:
        result = analyze_slide(slide, predictor, out, options)
    prob, covered = decode_heatmap(tifffile.imread(result.path("heatmap"), key=0))
    params = result.result["provenance"]["parameters"]
    period = int(round(params["l0_tile_size"] / result.result["heatmap"]["hm_downsample"]))
    score = seam_score(np.where(covered, prob, np.nan), period)
    evidence = result.result["evidence"]
    return {
        "seam": score.to_dict(),
        "wall_s": round(clock.wall_s, 3),
        "model_s": result.result["timings_s"]["chunks_infer"],
        "tiles": evidence["tiles_analysed"],
        "tissue_mm2": evidence.get("tissue_area_mm2"),
        "label": result.label,
        "regions": params.get("regions"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("slide", type=Path, nargs="?", default=None, help="default: CMU-1-Small-Region.svs")
    ap.add_argument("--mpp", type=float, default=None, help="mpp override (e.g. for a slide without one)")
    ap.add_argument("--model", type=Path, default=REPO_ROOT / "model" / "weights" / "pixelcam-glas-lite0-s5.onnx")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--modes", default="dense,tiles,overlap-cosine", help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--json", type=Path, default=None, help="default: bench/_out/bench_seams-<time>.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    slide = args.slide or shared_data_dir() / "slides" / "CMU-1-Small-Region.svs"
    predictor = Predictor(args.model, threads=args.threads)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"unknown modes {unknown}; choose from {sorted(MODES)}")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="pixelcam-seams-") as work:
        for k in range(args.repeats):
            for mode in modes:
                options = AnalysisOptions(mpp_override=args.mpp, **MODES[mode])
                runs[mode].append(measure(slide, predictor, options, Path(work) / f"{mode}-{k}"))
    results = {"machine": machine_info(), "slide": slide.name, "mpp_override": args.mpp,
               "model_sha256": predictor.sha256, "threads": args.threads, "runs": runs}
    for mode, rs in runs.items():
        seams = [r["seam"]["score"] for r in rs]
        wall = [r["wall_s"] for r in rs]
        model = [r["model_s"] for r in rs]
        print(f"{mode:15s} seam score {np.median(seams):.2f} (x {rs[0]['seam']['x']:.2f}, y {rs[0]['seam']['y']:.2f}); "
              f"{rs[0]['tiles']} tiles; wall {np.median(wall):.2f} s, model {np.median(model):.2f} s; "
              f"call {rs[0]['label']}")
    out = args.json or BENCH_OUT / f"bench_seams-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
