"""Deep Zoom tile serving under concurrent load, measured with wrk against `pixelcam serve` on loopback.

Starts a private Redis and `pixelcam serve --workers 0` on a free port, uploads the slide, lays a finished job
next to it (a heatmap TIFF written by the stitching core, the job record marked done), then runs wrk with a Lua
script that walks distinct tile URLs of the top Deep Zoom levels. Scenarios:

- `slide`: JPEG slide tiles (every request renders: the server keeps no slide tile cache);
- `overlay-render`: overlay PNG tiles with a threshold that changes per request (no cache hit possible);
- `overlay-cached`: overlay PNG tiles of one colour map and threshold (the rendered-tile cache answers).

Prints tiles/s, p50/p99 latency and error counts per scenario, and writes them as JSON.

    .venv/bin/python bench/bench_tiles.py [--slide PATH] [--duration 20] [--connections 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import machine_info, parse_wrk, wait_ready  # noqa: E402
from bench.make_slide import shared_data_dir  # noqa: E402
from service import constants  # noqa: E402
from service.jobs.queue import JobQueue, connect  # noqa: E402
from service.jobs.redis_server import PrivateRedis, free_port  # noqa: E402
from service.outputs.deepzoom import DeepZoomGeometry  # noqa: E402
from service.outputs.stitching import HeatmapBand, HeatmapGrid, write_heatmap_tiff  # noqa: E402
from service.settings import Settings  # noqa: E402

HM_DS = 16.0
JOB_ID = "be" * 16


def upload(base: str, slide: Path) -> dict:
    req = urllib.request.Request(f"{base}/v1/slides?filename={slide.name}", data=slide.read_bytes(), method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def lay_finished_job(settings: Settings, slide_id: str, l0_size_wh: tuple[int, int]) -> None:
    """A done job: a smooth synthetic probability field over the slide, written as the pipeline writes it."""
    grid = HeatmapGrid(l0_size_wh, HM_DS)
    hm_w, hm_h = grid.hm_size_wh
    yy, xx = np.mgrid[0:hm_h, 0:hm_w].astype(np.float32)
    prob = 0.5 + 0.5 * np.sin(xx / 23.0) * np.cos(yy / 31.0)
    covered = np.ones((hm_h, hm_w), bool)
    folder = settings.jobs_dir / JOB_ID
    folder.mkdir(parents=True, exist_ok=True)
    write_heatmap_tiff(folder / "heatmap.tif", [HeatmapBand(0, prob, covered)], grid, l0_mpp=0.5,
                       description="bench")
    (folder / "result.json").write_text(json.dumps({"heatmap": {"hm_downsample": HM_DS}}))
    queue = JobQueue(connect(settings.redis_url), settings)
    queue.ensure_group()
    record, _ = queue.submit(JOB_ID, {"slide_id": slide_id, "slide_file": "", "model": "bench",
                                      "model_sha256": "0" * 64, "options": "{}", "mpp": ""})
    queue.transition(JOB_ID, record["generation"], constants.STATE_QUEUED, constants.STATE_DONE)


def tile_paths(geo: DeepZoomGeometry, prefix: str, ext: str, top_levels: int, limit: int) -> list[str]:
    """Distinct tile URLs of the top levels, shuffled (seeded) so that concurrent requests spread over the slide."""
    paths = []
    for z in range(max(0, geo.max_level - top_levels + 1), geo.max_level + 1):
        cols, rows = geo.tile_grid_wh(z)
        paths += [f"{prefix}/{z}/{c}_{r}.{ext}" for c in range(cols) for r in range(rows)]
    random.Random(0).shuffle(paths)
    return paths[:limit]


LUA = """
local paths = {%s}
local suffix = "%s"
local counter = 0
local offset = 0
setup = function(thread) thread:set("offset", math.random(0, #paths - 1)) end
init = function(args) offset = tonumber(wrk.thread:get("offset")) or 0 end
request = function()
  counter = counter + 1
  local p = paths[((counter + offset) %% #paths) + 1]
  if suffix == "vary" then
    p = p .. "?cmap=jet&threshold=" .. string.format("%%.4f", ((counter * 7919 + offset * 104729) %% 10000) / 10000)
  elseif suffix ~= "" then
    p = p .. suffix
  end
  return wrk.format("GET", p)
end
"""


def run_wrk(base: str, paths: list[str], suffix: str, args: argparse.Namespace, out: Path, name: str) -> dict:
    script = out / f"{name}.lua"
    script.write_text(LUA % (", ".join(json.dumps(p) for p in paths), suffix))
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
           "--timeout", "30s", "-s", str(script), base]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 120)
    (out / f"{name}.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed for {name}:\n{proc.stdout}\n{proc.stderr}")
    return parse_wrk(proc.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=shared_data_dir() / "slides" / "CMU-1-Small-Region.svs")
    parser.add_argument("--duration", type=int, default=20, help="seconds per scenario")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--top-levels", type=int, default=4, help="Deep Zoom levels walked, from full resolution")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "_out" / "tiles")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-tiles-") as tmp, PrivateRedis(Path(tmp) / "redis",
                                                                                  persist=False) as redis:
        port = free_port()
        storage = Path(tmp) / "storage"
        settings = Settings(redis_url=redis.url, storage_dir=storage, redis_prefix="bench")  # type: ignore[call-arg]
        env = dict(os.environ, PIXELCAM_REDIS_URL=redis.url, PIXELCAM_STORAGE_DIR=str(storage),
                   PIXELCAM_REDIS_PREFIX="bench", PIXELCAM_LOG_LEVEL="WARNING",
                   PIXELCAM_MODELS_DIR=str(Path(tmp) / "models"))
        server = subprocess.Popen([sys.executable, "-m", "service.cli.main", "serve", "--host", "127.0.0.1",
                                   "--port", str(port), "--workers", "0"], cwd=REPO, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, server, 60, probe="/healthz")  # no model is served here, so /readyz never turns 200
            slide = upload(base, args.slide)
            l0_wh = tuple(slide["info"]["l0_size_wh"])
            lay_finished_job(settings, slide["slide_id"], l0_wh)  # type: ignore[arg-type]
            geo = DeepZoomGeometry(l0_wh)  # type: ignore[arg-type]
            sid = slide["slide_id"]
            slide_paths = tile_paths(geo, f"/v1/slides/{sid}_files", "jpeg", args.top_levels, 20000)
            overlay_paths = tile_paths(geo, f"/v1/jobs/{JOB_ID}/overlay_files", "png", args.top_levels, 20000)
            results = {
                "slide": run_wrk(base, slide_paths, "", args, args.out, "slide"),
                "overlay-render": run_wrk(base, overlay_paths, "vary", args, args.out, "overlay-render"),
                "overlay-cached": run_wrk(base, overlay_paths[:200], "?cmap=jet&threshold=0.5", args, args.out,
                                          "overlay-cached"),
            }
        finally:
            server.terminate()
            server.wait(timeout=30)
    report = {"slide": str(args.slide), "l0_size_wh": list(l0_wh), "distinct_slide_tiles": len(slide_paths),
              "levels": f"{geo.max_level - args.top_levels + 1}..{geo.max_level}", "connections": args.connections,
              "wrk_threads": args.threads, "duration_s": args.duration, "machine": machine_info(),
              "results": results}
    (args.out / "bench_tiles.json").write_text(json.dumps(report, indent=1))
    print(f"slide {args.slide.name} {l0_wh[0]}x{l0_wh[1]}, levels {report['levels']}, "
          f"{args.connections} connections, {args.duration} s per scenario")
    for name, r in results.items():
        print(f"  {name:15s} {r['requests_per_s']:8.1f} tiles/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
              f"requests {r['requests']}  non-2xx {r['non_2xx']}  socket errors {r['socket_errors']}")
    ok = all(r["non_2xx"] == 0 and r["socket_errors"] == 0 for r in results.values())
    return 0 if ok and math.isfinite(sum(r["requests_per_s"] for r in results.values())) else 1


if __name__ == "__main__":
    sys.exit(main())
