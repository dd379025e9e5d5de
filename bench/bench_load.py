"""Load test of a running `pixelcam serve`: many concurrent job submissions and Deep Zoom tile requests.

Starts `pixelcam serve` (embedded Redis, local workers, a throwaway storage folder) on 127.0.0.1, uploads one
slide, then at the same time
- `wrk` hammers the slide's Deep Zoom tiles (every tile of every level, round robin) for `--tile-seconds`, and
- an asyncio httpx client sends `--submissions` job requests with `--concurrency` in flight: `--jobs` distinct
  jobs (different `min_tissue`), each asked for several times (idempotent), plus raw `/v1/analyze` uploads;
then waits until every job has finished. Everything must succeed: any error, non-2xx or failed job fails the run.

    .venv/bin/python bench/bench_load.py [--jobs 12] [--submissions 240] [--concurrency 32] [--workers 1]

Prints a JSON report and writes it to bench/_out/bench_load-<time>.json. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import BENCH_OUT, REPO_ROOT, BenchError, machine_info, parse_wrk, wait_ready  # noqa: E402
from bench.make_slide import shared_data_dir  # noqa: E402
from service.jobs.redis_server import free_port  # noqa: E402
from service.outputs.deepzoom import DeepZoomGeometry  # noqa: E402

logger = logging.getLogger("bench_load")

_WRK_SCRIPT = """
paths = {%s}
i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i %% #paths) + 1])
end
"""


def start_server(storage: Path, port: int, workers: int, api_key: str = "") -> subprocess.Popen[bytes]:
    """`pixelcam serve` with its own storage and embedded Redis; waits until /readyz answers 200."""
    env = dict(os.environ, PIXELCAM_STORAGE_DIR=str(storage), PIXELCAM_PORT=str(port), PIXELCAM_HOST="127.0.0.1",
               PIXELCAM_WORKERS=str(workers), PIXELCAM_LOG_LEVEL="WARNING", PIXELCAM_API_KEYS=api_key)
    env.pop("PIXELCAM_REDIS_URL", None)
    log = (storage.parent / "serve.log").open("wb")
    exe = shutil.which("pixelcam", path=str(Path(sys.executable).parent)) or "pixelcam"
    proc = subprocess.Popen([exe, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    wait_ready(f"http://127.0.0.1:{port}", proc, 120, log_hint=str(storage.parent / "serve.log"))
    return proc


def tile_paths(slide_id: str, width: int, height: int) -> list[str]:
    """Every Deep Zoom tile of the slide, level by level, in the service's own tile geometry."""
    geo = DeepZoomGeometry((width, height))
    return [f"/v1/slides/{slide_id}_files/{level}/{col}_{row}.jpeg"
            for level in range(geo.level_count)
            for row in range(geo.tile_grid_wh(level)[1])
            for col in range(geo.tile_grid_wh(level)[0])]


def run_wrk(base: str, paths: list[str], seconds: int, connections: int, workdir: Path,
            headers: dict[str, str]) -> subprocess.Popen[str]:
    """Start wrk on the tile paths (round robin); returns the running process."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError("wrk is not installed: `apt-get install -y wrk`")
    script = workdir / "tiles.lua"
    script.write_text(_WRK_SCRIPT % ", ".join(json.dumps(p) for p in paths))
    cmd = [wrk, "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "60s", "--latency", "-s", str(script)]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    cmd.append(base)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def submit_all(base: str, slide_id: str, slide_bytes: bytes, n_jobs: int, submissions: int,
                     concurrency: int, headers: dict[str, str]) -> dict[str, Any]:
    """Send the job requests with `concurrency` in flight; every answer must be 200/202."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    job_ids: set[str] = set()
    sem = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        options = {"min_tissue": round(0.05 + 0.03 * (i % n_jobs), 2), "write_detections": False}
        async with sem:
            t0 = time.perf_counter()
            if i % 10 == 9:  # one in ten uploads the slide again with the request (deduplicated by hash)
                resp = await client.post("/v1/analyze", content=slide_bytes,
                                         params={"filename": "slide.svs", "options": json.dumps(options)})
            else:
                resp = await client.post("/v1/jobs", json={"slide_id": slide_id, "options": options})
            latencies.append(time.perf_counter() - t0)
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        if resp.status_code in (200, 202):
            job_ids.add(resp.json()["job_id"])

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120, headers=headers) as client:
        await asyncio.gather(*(one(client, i) for i in range(submissions)))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "submissions": submissions, "concurrency": concurrency, "distinct_jobs": len(job_ids),
        "statuses": {str(k): v for k, v in sorted(statuses.items())}, "wall_s": round(wall, 3),
        "per_s": round(submissions / wall, 1),
        "latency_ms": {"p50": round(1000 * statistics.median(latencies), 1),
                       "p95": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 1),
                       "max": round(1000 * latencies[-1], 1)},
        "job_ids": sorted(job_ids),
    }


def wait_jobs(base: str, job_ids: list[str], timeout_s: float, headers: dict[str, str]) -> dict[str, Any]:
    """Poll until every job has finished; their states, tiles and the time the last one took."""
    t0 = time.perf_counter()
    states: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=base, timeout=30, headers=headers) as client:
        while time.perf_counter() - t0 < timeout_s:
            states = {j: client.get(f"/v1/jobs/{j}").json() for j in job_ids}
            if all(s["state"] in ("done", "failed", "cancelled") for s in states.values()):
                break
            time.sleep(0.5)
    by_state: dict[str, int] = {}
    for s in states.values():
        by_state[s["state"]] = by_state.get(s["state"], 0) + 1
    tiles = sum(s.get("tiles_done") or 0 for s in states.values())
    wall = time.perf_counter() - t0
    return {"states": by_state, "tiles_done": tiles, "wait_after_submissions_s": round(wall, 1),
            "errors": sorted({s["error"] for s in states.values() if s.get("error")})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=None, help="slide to upload (default: the CMU crop)")
    parser.add_argument("--jobs", type=int, default=12, help="distinct jobs")
    parser.add_argument("--submissions", type=int, default=240, help="job requests in all")
    parser.add_argument("--concurrency", type=int, default=32, help="job requests in flight")
    parser.add_argument("--tile-seconds", type=int, default=20, help="how long wrk requests tiles")
    parser.add_argument("--tile-connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--workers", type=int, default=1, help="local worker processes of pixelcam serve")
    parser.add_argument("--api-key", action="store_true", help="run with PIXELCAM_API_KEYS set (bearer tokens)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the report
    slide = args.slide or shared_data_dir() / "slides" / "CMU-1-Small-Region.svs"
    work = Path(tempfile.mkdtemp(prefix="pixelcam-load-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    api_key = secrets.token_urlsafe(32) if args.api_key else ""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    server = start_server(work / "storage", port, args.workers, api_key)
    try:
        slide_bytes = slide.read_bytes()
        uploaded = httpx.post(f"{base}/v1/slides", content=slide_bytes, params={"filename": slide.name}, timeout=60,
                              headers=headers)
        uploaded.raise_for_status()
        info = uploaded.json()
        width, height = info["info"]["l0_size_wh"]
        paths = tile_paths(info["slide_id"], width, height)
        logger.info("slide %s: %d tiles; wrk for %d s while %d job requests go out", slide.name, len(paths),
                    args.tile_seconds, args.submissions)
        wrk = run_wrk(base, paths, args.tile_seconds, args.tile_connections, work, headers)
        submitted = asyncio.run(submit_all(base, info["slide_id"], slide_bytes, args.jobs, args.submissions,
                                           args.concurrency, headers))
        finished = wait_jobs(base, submitted["job_ids"], timeout_s=1800, headers=headers)
        wrk_out, _ = wrk.communicate(timeout=args.tile_seconds + 60)
        tiles = parse_wrk(wrk_out)
    finally:
        server.terminate()
        server.wait(timeout=60)
    report = {
        "bench": "bench_load", "machine": machine_info(), "slide": slide.name, "workers": args.workers,
        "api_keys": bool(api_key),
        "tile_paths": len(paths), "tiles": tiles, "submissions": {k: v for k, v in submitted.items() if k != "job_ids"},
        "jobs": finished,
    }
    ok = (set(submitted["statuses"]) <= {"200", "202"} and finished["states"] == {"done": len(submitted["job_ids"])}
          and tiles["requests"] > 0 and tiles["non_2xx"] == 0 and tiles["socket_errors"] == 0)
    report["all_ok"] = ok
    BENCH_OUT.mkdir(parents=True, exist_ok=True)
    out = BENCH_OUT / f"bench_load-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
