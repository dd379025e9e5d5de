"""`pixelcam serve` (API + local workers and trainers, embedded Redis by default), `pixelcam worker` (a worker
alone) and `pixelcam trainer` (a trainer alone: runs training jobs, needs the `train` extra)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from service import constants
from service.jobs.redis_server import PrivateRedis, dies_with_parent
from service.settings import Settings, get_settings

logger = logging.getLogger(__name__)

__all__ = ["add_serve_parser", "add_worker_parser", "add_trainer_parser", "serve", "torch_available", "trainer_count"]

_STOP_TIMEOUT_S = 15.0


def add_serve_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `pixelcam serve`."""
    p = subparsers.add_parser("serve", help="run the API and local workers (starts a private Redis if none is set)",
                              description="Settings come from PIXELCAM_* environment variables; flags override.")
    p.add_argument("--host", help="address to bind (PIXELCAM_HOST)")
    p.add_argument("--port", type=int, help="port to bind (PIXELCAM_PORT)")
    p.add_argument("--workers", type=int, help="local worker processes (PIXELCAM_WORKERS)")
    p.add_argument("--trainers", type=int, help="local trainer processes for training jobs (PIXELCAM_TRAINERS; "
                                                "default -1: one when torch is installed, else none; 0: none)")
    p.set_defaults(func=_serve_command)


def add_worker_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `pixelcam worker`."""
    p = subparsers.add_parser("worker", help="run one queue worker (needs PIXELCAM_REDIS_URL)",
                              description="Joins the queue at PIXELCAM_REDIS_URL; reads slides and writes results "
                                          "under PIXELCAM_STORAGE_DIR, which must be the storage the API uses.")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.set_defaults(func=_worker_command)


def add_trainer_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `pixelcam trainer`."""
    p = subparsers.add_parser("trainer", help="run one trainer for training jobs (needs PIXELCAM_REDIS_URL and torch)",
                              description="Joins the training queue at PIXELCAM_REDIS_URL and runs one training job "
                                          "at a time (`python -m training.run` in a child process); reads slides and "
                                          "registers models under PIXELCAM_STORAGE_DIR / PIXELCAM_MODELS_DIR, which "
                                          "must be the storage the API uses. Needs the `train` extra (torch).")
    p.add_argument("--burst", action="store_true", help="exit when no training job is waiting")
    p.set_defaults(func=_trainer_command)


def torch_available() -> bool:
    """Whether torch (the `train` extra) can be imported here; looked up without importing it."""
    return importlib.util.find_spec("torch") is not None


def trainer_count(settings: Settings) -> int:
    """The trainers `serve` starts: the setting, or with -1 one when torch is installed and none otherwise."""
    if settings.trainers >= 0:
        return settings.trainers
    return 1 if torch_available() else 0


def _serve_command(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("workers", args.workers),
                                   ("trainers", args.trainers)) if v is not None}
    settings = get_settings().model_copy(update=overrides)
    return serve(settings)


def _worker_command(args: argparse.Namespace) -> int:
    from service.jobs.worker import Worker  # heavy (onnxruntime, OpenCV): see service.cli.main

    settings = get_settings()
    _configure_logging(settings)
    if not settings.redis_url:
        logger.error("a standalone worker needs PIXELCAM_REDIS_URL (the Redis the API uses)")
        return 2
    worker = Worker(settings)
    _stop_on_signals(worker.stop_event)
    worker.run(burst=args.burst)
    return 0


def _trainer_command(args: argparse.Namespace) -> int:
    from service.jobs.trainer import Trainer  # imported when it runs, as the worker is

    settings = get_settings()
    _configure_logging(settings)
    if not settings.redis_url:
        logger.error("a standalone trainer needs PIXELCAM_REDIS_URL (the Redis the API uses)")
        return 2
    if not torch_available():
        logger.error("the trainer runs the training recipe, which needs torch: install the `train` extra "
                     "(pip install 'pixelcam[train]', or the docker/Dockerfile.train image)")
        return 2
    trainer = Trainer(settings)
    _stop_on_signals(trainer.stop_event)
    trainer.run(burst=args.burst)
    return 0


def _configure_logging(settings: Settings) -> None:
    """PIXELCAM_LOG_LEVEL for the long-running commands (the `pixelcam` entry point may have set handlers)."""
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(settings.log_level)


def _stop_on_signals(event: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        event.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


class _WorkerPool:
    """Local worker (or trainer) processes (`python -m service.jobs.worker`), restarted when one dies."""

    def __init__(self, count: int, env: dict[str, str], module: str = "service.jobs.worker",
                 what: str = "worker") -> None:
        self.count = count
        self.env = env
        self.module = module
        self.what = what
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="worker-pool", daemon=True)

    def start(self) -> None:
        self.procs = [self._spawn() for _ in range(self.count)]
        self._monitor.start()
        logger.info("started %d local %s(s)", self.count, self.what)

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", self.module], env=self.env,
                                preexec_fn=dies_with_parent(signal.SIGTERM))

    def _watch(self) -> None:
        while not self._stop.wait(2.0):
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None and not self._stop.is_set():
                    logger.warning("%s pid %d exited with %s; starting a new one", self.what, proc.pid,
                                   proc.returncode)
                    self.procs[i] = self._spawn()

    def stop(self) -> None:
        self._stop.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """uvicorn re-raises the SIGTERM it handled once it has shut down; exit through `finally` blocks then."""
    raise SystemExit(0)


def serve(settings: Settings) -> int:
    """Run the API in this process and `settings.workers` worker processes; stop them all on exit."""
    # heavy (FastAPI, onnxruntime, OpenCV): imported when the server starts, not for `pixelcam --help`
    import uvicorn

    from service.api import create_app

    _configure_logging(settings)
    if not settings.api_key_list and settings.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("the API listens on %s without API keys: anyone who reaches it can upload, analyse and read "
                       "results; set PIXELCAM_API_KEYS (docs/reliability.md)", settings.host)
    storage = Path(settings.storage_dir).resolve()
    settings = settings.model_copy(update={"storage_dir": storage})
    private: PrivateRedis | None = None
    if not settings.redis_url:
        private = PrivateRedis(storage / constants.REDIS_DIR)
        settings = settings.model_copy(update={"redis_url": private.start()})
    if settings.threads == 0 and settings.workers > 1:
        # local workers share this machine's cores instead of each taking all of them
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        settings = settings.model_copy(update={"threads": max(1, cores // settings.workers)})
    env = dict(os.environ, **settings.to_env())
    pool = _WorkerPool(settings.workers, env)
    trainers = _WorkerPool(trainer_count(settings), env, module="service.jobs.trainer", what="trainer")
    if settings.trainers == -1 and not trainers.count:
        logger.info("no local trainer: torch is not installed (training jobs wait for a `pixelcam trainer`)")
    try:
        app = create_app(settings)
        pool.start()
        trainers.start()
        logger.info("serving on http://%s:%d (redis %s)", settings.host, settings.port,
                    "embedded" if private else settings.redis_url)
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        # graceful shutdown waits for open requests, but never longer than the grace period
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                    timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_grace_s)))
    finally:
        pool.stop()
        trainers.stop()
        if private is not None:
            private.stop()
    stuck = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if stuck:  # a request thread that cannot be interrupted must not keep the process alive past the grace period
        logger.warning("exiting with request threads still running after the grace period: %s", ", ".join(stuck))
        logging.shutdown()
        os._exit(0)
    return 0
