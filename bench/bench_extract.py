"""Tile extraction for `--dataset slides`: tiles/s and peak RSS, for manifests of 1, 2, 4 ... slides.

Each manifest size runs in a fresh process (its own peak RSS) that extracts every slide's tiles into an empty
cache exactly as `training/run.py --dataset slides` does (`training.slide_data.extract_slide`: the service's tiler
and TileReader, batches written into a memory map). The slides are hard links of one generated slide
(`bench/make_slide.py`, real H&E mosaicked), so every manifest size reads the same pixels per slide; the memory
must stay flat as slides are added.

    .venv/bin/python bench/bench_extract.py [--width 16384 --height 12288] [--counts 1,2,4] [--input-mpp 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_DATA, REPO_ROOT, machine_info, peak_rss_mib, run_child  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))


def child(manifest: Path, cache: Path, input_mpp: float, input_size: int) -> dict[str, object]:
    """Extract every slide of the manifest into `cache`; the report of this process."""
    from training.slide_data import extract_slide, read_manifest

    entries = read_manifest(manifest, ("benign", "malignant"))
    t0 = time.perf_counter()
    tiles = 0
    for entry in entries:
        out = extract_slide(entry, cache, class_names=("benign", "malignant"), input_mpp=input_mpp,
                            input_size=input_size, label_from="slide", positive_class="malignant",
                            annotation_classes=("Gland",), progress=False)
        tiles += out.n_tiles
    wall = time.perf_counter() - t0
    return {"slides": len(entries), "tiles": tiles, "wall_s": round(wall, 3), "tiles_per_s": round(tiles / wall, 1),
            "peak_rss_mib": round(peak_rss_mib(), 1)}


def _slide(width: int, height: int) -> Path:
    """The generated slide (made once, then reused from bench/_data)."""
    path = BENCH_DATA / f"extract_{width}x{height}.svs"
    if not path.is_file():
        BENCH_DATA.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "make_slide.py"), str(path), "--width", str(width),
                        "--height", str(height)], check=True, cwd=REPO_ROOT)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=16384)
    ap.add_argument("--height", type=int, default=12288)
    ap.add_argument("--counts", default="1,2,4", help="manifest sizes (slides), comma-separated")
    ap.add_argument("--input-mpp", type=float, default=1.0)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--child", nargs=2, type=Path, metavar=("MANIFEST", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.input_mpp, args.input_size)))  # noqa: T201
        return 0
    slide = _slide(args.width, args.height)
    counts = [int(c) for c in args.counts.split(",")]
    runs = []
    with tempfile.TemporaryDirectory(prefix="pixelcam-bench-extract-", dir=BENCH_DATA) as tmp:
        work = Path(tmp)
        for i in range(max(counts)):
            os.link(slide, work / f"slide{i}.svs")
        for n in counts:
            manifest = work / f"manifest{n}.csv"
            manifest.write_text("slide,label\n" + "".join(f"slide{i}.svs,benign\n" for i in range(n)))
            cache = work / f"cache{n}"
            runs.append(run_child([__file__, "--child", str(manifest), str(cache), "--input-mpp",
                                   str(args.input_mpp), "--input-size", str(args.input_size)], timeout_s=3600))
            shutil.rmtree(cache, ignore_errors=True)
    rss = [r["peak_rss_mib"] for r in runs]
    report = {"bench": "extract", "machine": machine_info(), "slide": slide.name, "input_mpp": args.input_mpp,
              "input_size": args.input_size, "runs": runs,
              "rss_ratio_most_vs_fewest_slides": round(rss[-1] / rss[0], 3)}
    print(json.dumps(report))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
