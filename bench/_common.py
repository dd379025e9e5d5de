"""Shared helpers of the benchmarks: the machine description, CPU-time clocks, child processes."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import resource
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
# generated slides and outputs (git-ignored); the variables move them, e.g. for a test in a temporary folder
BENCH_DATA = Path(os.environ.get("PIXELCAM_BENCH_DATA") or REPO_ROOT / "bench" / "_data")
BENCH_OUT = Path(os.environ.get("PIXELCAM_BENCH_OUT") or REPO_ROOT / "bench" / "_out")
# What the benchmarks load beyond the packages `service.outputs.report` records: the naive loop's torch, and the export.
_BENCH_ONLY_PACKAGES = ("torch", "onnx", "pillow")


class BenchError(RuntimeError):
    """A benchmark step could not run; the message says what is missing."""


def _cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    """Physical memory in GiB from /proc/meminfo."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _versions() -> dict[str, str]:
    """The versions a result records (`service.outputs.report.software_versions`) plus those only the benchmarks load."""
    from service.outputs.report import software_versions

    out = software_versions()
    for name in _BENCH_ONLY_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _git_revision() -> str:
    """The commit the code was measured at, with '-dirty' when tracked files differ from it.

    ``PIXELCAM_BENCH_REVISION`` overrides it, for a copy of a working tree whose git history is not the
    one it was copied from (a remote GPU machine, say).
    """
    if os.environ.get("PIXELCAM_BENCH_REVISION"):
        return os.environ["PIXELCAM_BENCH_REVISION"]
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores usable, RAM, load, OS and versions."""
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_gib": _mem_total_gib(),
        "loadavg_1_5_15": list(os.getloadavg()),
        "os": platform.platform(),
        "versions": _versions(),
        "git": _git_revision(),
    }


def _cpu_s() -> float:
    """User + system CPU seconds of this process, all threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Clock:
    """Wall and process-CPU seconds of one measured block."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def rate(self, n: int) -> dict[str, float]:
        """Items per wall second and CPU seconds per item."""
        return {
            "n": n,
            "wall_s": round(self.wall_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "per_s": round(n / self.wall_s, 3) if self.wall_s > 0 else float("nan"),
            "cpu_s_per_item": round(self.cpu_s / n, 5) if n else float("nan"),
        }


@contextmanager
def clocked() -> Iterator[Clock]:
    """Measure the wall time and the CPU time of the block (the CPU time includes every thread)."""
    clock = Clock()
    wall0, cpu0 = time.perf_counter(), _cpu_s()
    try:
        yield clock
    finally:
        clock.wall_s = time.perf_counter() - wall0
        clock.cpu_s = _cpu_s() - cpu0


def ru_maxrss_mib() -> float:
    """``ru_maxrss`` of this process in MiB (Linux reports KiB, macOS bytes)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def peak_rss_mib() -> float:
    """Peak RSS of this process's own address space in MiB (``VmHWM``), else ``ru_maxrss``.

    On Linux, ``ru_maxrss`` of a process started by fork/vfork + exec keeps the parent's resident size at the
    fork (the kernel folds the old address space's high-water mark into it at exec), so a child of a large
    parent reports at least the parent's size. ``VmHWM`` belongs to the address space created by exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return ru_maxrss_mib()


def run_child(args: list[str], timeout_s: float) -> dict[str, Any]:
    """Run ``python <args>`` in a fresh process; its last stdout line is a JSON report."""
    cmd = [sys.executable, *args]
    logger.info("child: %s", " ".join(cmd))
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise BenchError(f"child {' '.join(args)} ran over {timeout_s:.0f} s; use a smaller slide") from err
    if done.returncode != 0:
        raise BenchError(f"child {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"child {' '.join(args)} printed no JSON report:\n{done.stdout[-2000:]}")
    report: dict[str, Any] = json.loads(lines[-1])
    return report


_WRK_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests, rate, latency percentiles in ms and error counts from the summary of ``wrk --latency``."""
    requests = re.search(r"(\d+) requests in", text)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    lat = {
        pct: round(float(value) * _WRK_UNIT_MS[unit], 3)
        for pct, value, unit in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    }
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return {
        "requests": int(requests.group(1)) if requests else 0,
        "requests_per_s": float(rate.group(1)) if rate else None,
        "p50_ms": lat.get("50"),
        "p90_ms": lat.get("90"),
        "p99_ms": lat.get("99"),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sum(int(v) for v in sock.groups()) if sock else 0,
    }


def wait_ready(
    base: str, server: subprocess.Popen[Any], timeout_s: float, probe: str = "/readyz", log_hint: str = "its output"
) -> None:
    """Poll ``base`` + ``probe`` until it answers 200; fail early if the server process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise BenchError(f"pixelcam serve exited ({server.returncode}); see {log_hint}")
        try:
            with urllib.request.urlopen(f"{base}{probe}", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    server.terminate()
    raise BenchError(f"pixelcam serve at {base} was not ready within {timeout_s:.0f} s; see {log_hint}")
