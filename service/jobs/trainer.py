"""The trainer: takes training jobs from their Redis Stream one at a time and runs the recipe on each.

The recipe (`python -m training.run`, which needs the `train` extra: torch) runs as a child process in its own
process group, so a cancel stops all of it (SIGTERM, then SIGKILL after `TRAINING_STOP_GRACE_S`); the kernel kills
it when the trainer dies (`PR_SET_PDEATHSIG`), so a killed trainer leaves no training behind. This process imports
no torch: it writes the job's manifest and config into the job's folder, follows the recipe's `progress.json`,
renews its lease on the job, and on success moves the exported model into the models directory through
`ModelRegistry.add` (a hidden temporary file first, so the directory never holds half a model).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import redis
import yaml

from service import constants
from service.analysis.plan import file_sha256
from service.errors import ServiceError, SlideNotFound
from service.jobs.queue import connect
from service.jobs.redis_server import dies_with_parent
from service.jobs.storage import ModelRegistry, SlideStore
from service.jobs.training_queue import (
    TrainingMessage,
    TrainingQueue,
    models_tmp_prefix,
    remove_models_tmp,
    sweep_dead_trainers,
)
from service.jobs.training_request import REQUEST_FILE, training_dir
from service.settings import Settings, get_settings

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "last_error", "explain_rows", "read_progress", "evaluation_summary", "main", "RECIPE_MODULE"]

RECIPE_MODULE = "training.run"
MANIFEST_FILE = "manifest.csv"
CONFIG_FILE = "config.yaml"
LOG_FILE = "trainer.log"  # the recipe's stdout and stderr
RUN_DIR = "run"
_PROGRESS_FIELDS = ("stage", "stage_index", "epoch", "epochs", "message")
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d[ T][\d:,.]+ (?P<level>[A-Z]+) (?P<name>[\w.]+): (?P<message>.*)$")
_MANIFEST_ROW = re.compile(r"\bmanifest(?:\.csv)? row (\d+)")
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(?P<type>[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)"
                             r"|KeyboardInterrupt|MemoryError)(?::\s*(?P<message>.*))?$")


class _Stopped(Exception):
    """The trainer itself is stopping (SIGTERM) while a job runs."""


def read_progress(path: Path) -> dict[str, Any] | None:
    """The recipe's progress.json, or None while there is none (or it cannot be read)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def last_error(log_text: str, returncode: int) -> str:
    """Why a run failed, from the end of its log: the last exception line of the last traceback, else the last
    ERROR record, else the last line; with the exit code or the signal that ended it."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        how = f"the training run was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    else:
        how = f"the training run failed (exit code {returncode})"
    lines = [line.rstrip() for line in log_text.splitlines()[-400:] if line.strip()]
    reason = ""
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        start = max(i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)"))
        for line in lines[start + 1:]:
            match = _EXCEPTION_LINE.match(line)
            if match and not line.startswith(" "):
                reason = line
    if not reason:
        for line in reversed(lines):
            match = _LOG_LINE.match(line)
            if match and match.group("level") in ("ERROR", "CRITICAL"):
                reason = match.group("message")
                break
    if not reason and lines:
        reason = lines[-1]
    return f"{how}: {reason}" if reason else how


def explain_rows(text: str, slide_ids: list[str]) -> str:
    """The recipe's "manifest row N" (1-based data rows) as the request's `slides[N-1]` with its slide id."""
    def name(match: re.Match[str]) -> str:
        i = int(match.group(1)) - 1
        return f"slides[{i}] (slide {slide_ids[i]})" if 0 <= i < len(slide_ids) else match.group(0)
    return _MANIFEST_ROW.sub(name, text)


def evaluation_summary(report: dict[str, Any] | None, training_id: str) -> dict[str, Any]:
    """What `GET /v1/models/{name}` shows of a run's evaluate/report.json: the held-out slides' slide-path
    accuracy and PxAP first, then the recipe's per-model results."""
    report = report or {}
    summary: dict[str, Any] = {"training_job": training_id}
    slide_path = report.get("slide_path")
    if isinstance(slide_path, dict):  # the analysis options it used are the service's defaults: left out
        summary["slide_path"] = {k: v for k, v in slide_path.items() if k != "options"}
    results = report.get("results")
    if isinstance(results, dict):  # without the checkpoints' paths on the trainer's machine
        summary["results"] = {name: {k: v for k, v in r.items() if k != "checkpoint"} if isinstance(r, dict) else r
                              for name, r in results.items()}
    for key in ("eval_split", "n_test", "pixelcam_beats_baseline_pxap"):
        if key in report:
            summary[key] = report[key]
    return summary


class Trainer:
    """Runs training jobs until stopped (or, in burst mode, until no message is waiting)."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None, name: str | None = None) -> None:
        self.settings = settings
        timeout_s = settings.redis_timeout_s + settings.block_ms / 1000  # a blocking read is not a hang
        self.queue = TrainingQueue(client or connect(settings.redis_url, socket_timeout_s=timeout_s), settings)
        self.queue.ensure_group()
        self.name = name or f"trainer-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.models = ModelRegistry(settings.models_dir, settings.default_model)
        self.slides = SlideStore(settings.slides_dir)
        self.stop_event = threading.Event()
        self.processed = 0
        self.process: subprocess.Popen[bytes] | None = None  # the recipe now running, if any

    # --- loop -------------------------------------------------------------------------------------------------
    def run(self, burst: bool = False) -> int:
        """Work until `stop_event` is set (burst: until no message is waiting); returns the jobs handled."""
        logger.info("trainer %s started (storage %s, prefix %s)", self.name, self.settings.storage_dir,
                    self.settings.redis_prefix)
        while not self.stop_event.is_set():
            try:
                for training_id in sweep_dead_trainers(self.queue, self.models):
                    logger.warning("trainer %s: training job %s lost its trainer and was ended", self.name,
                                   training_id)
                self.queue.mark_alive(self.name)
                msg = self.queue.read(self.name, self.settings.block_ms)
                if msg is None:
                    if burst:
                        break
                    continue
                self.handle(msg)
                self.processed += 1
            except (redis.ConnectionError, redis.TimeoutError) as err:
                logger.warning("trainer %s: redis unreachable (%s); retrying", self.name, err)
                self.stop_event.wait(1.0)
            except redis.ResponseError as err:
                if "NOGROUP" not in str(err):
                    raise
                logger.error("trainer %s: the training queue is gone from Redis; recreating it", self.name)
                self.queue.ensure_group()
        return self.processed

    def handle(self, msg: TrainingMessage) -> None:
        """Run one message's job if it is still queued; acknowledge it once the job has ended."""
        try:
            record = self.queue.get(msg.training_id)
        except ServiceError:
            self.queue.ack(msg)
            return
        if record["state"] == constants.STATE_RUNNING:
            # a running job's message reclaimed: its trainer stopped renewing the lease (a sweep ends the job)
            if not sweep_dead_trainers(self.queue, self.models, [msg.training_id]):
                return  # its trainer is alive after all (a slow heartbeat): leave the message to it
            self.queue.ack(msg)
            return
        if record["state"] != constants.STATE_QUEUED or not self.queue.start(msg.training_id, self.name, msg):
            self.queue.ack(msg)  # cancelled before it started, or taken by another trainer
            return
        logger.info("trainer %s: training job %s started (model name %s)", self.name, msg.training_id,
                    record.get("name"))
        try:
            self._run_job(msg, record)
        except _Stopped:
            self._stop_recipe()
            self._fail(msg.training_id, "the trainer was stopped (SIGTERM) while the job ran; the run was abandoned "
                                        "and no model was registered; resubmit the training job")
        except (redis.ConnectionError, redis.TimeoutError):
            self._stop_recipe()
            raise  # the lease expires; a sweep fails the job with the reason
        except Exception as err:
            self._stop_recipe()
            logger.exception("trainer %s: training job %s failed", self.name, msg.training_id)
            reason = str(err) if isinstance(err, ServiceError) else f"{type(err).__name__}: {err}"
            self._fail(msg.training_id, reason)
        finally:
            remove_models_tmp(self.models.root, msg.training_id)
        self.queue.ack(msg)

    def _fail(self, training_id: str, reason: str) -> None:
        self.queue.finish(training_id, self.name, constants.STATE_FAILED, error=self._public(reason))

    def _public(self, text: str) -> str:
        """An error as its users read it: the server's storage paths replaced by what they are."""
        for folder, label in ((self.settings.training_dir, "<training storage>"),
                              (self.settings.slides_dir, "<slide storage>"), (self.settings.models_dir, "<models>"),
                              (self.settings.storage_dir, "<storage>")):
            text = text.replace(str(Path(folder).resolve()), label).replace(str(folder), label)
        return text

    # --- one job ----------------------------------------------------------------------------------------------
    def _prepare(self, folder: Path, request: dict[str, Any]) -> Path:
        """Write manifest.csv and config.yaml into the job's folder; returns the config's path."""
        rows = []
        for i, item in enumerate(request["slides"]):
            try:
                slide = self.slides.get(item["slide_id"])
            except SlideNotFound as err:
                raise ServiceError(f"slides[{i}]: slide {item['slide_id']} is gone from the storage (deleted after "
                                   "the job was submitted?); upload it again and resubmit the job") from err
            mpp = item.get("mpp")
            rows.append({"slide": str(slide.path.resolve()), "label": item["label"],
                         "annotations": item.get("annotations") or "", "mpp": "" if mpp is None else repr(mpp),
                         "split": ""})
        manifest = folder / MANIFEST_FILE
        with manifest.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["slide", "label", "annotations", "mpp", "split"])
            writer.writeheader()
            writer.writerows(rows)
        config = dict(request.get("config") or {})
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = self.settings.training_threads or cores
        config.update(dataset="slides", manifest=str(manifest.resolve()), run_dir=str((folder / RUN_DIR).resolve()),
                      export_name=f"{request['name']}.onnx",
                      threads=min(int(config.get("threads") or threads), threads))
        path = folder / CONFIG_FILE
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def _run_job(self, msg: TrainingMessage, record: dict[str, str]) -> None:
        training_id = msg.training_id
        folder = training_dir(self.settings.training_dir, training_id)
        try:
            request = json.loads((folder / REQUEST_FILE).read_text())
        except (OSError, ValueError) as err:
            raise ServiceError(f"the job's folder on the storage is missing or damaged ({type(err).__name__}); "
                               "check that this trainer sees the same PIXELCAM_STORAGE_DIR as the API, then "
                               "resubmit the job") from err
        run_dir = folder / RUN_DIR
        shutil.rmtree(run_dir, ignore_errors=True)  # a job runs once; nothing of an earlier try is reused
        config = self._prepare(folder, request)
        log_path = folder / LOG_FILE
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", RECIPE_MODULE, "--config", str(config.resolve())], cwd=folder, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=dies_with_parent(signal.SIGKILL))
        self.queue.publish(training_id, self.name, pid=str(self.process.pid), message="starting the recipe")
        returncode = self._follow(msg, run_dir)
        self.process = None
        if returncode is None:
            return  # cancelled, or ended by someone else: nothing to register
        if returncode != 0:
            text = log_path.read_text(errors="replace") if log_path.is_file() else ""
            train_log = run_dir / "train.log"
            if not _EXCEPTION_LINE.search(text) and train_log.is_file():
                text += "\n" + train_log.read_text(errors="replace")
            reason = explain_rows(last_error(text, returncode), [s["slide_id"] for s in request["slides"]])
            self._fail(training_id, reason)
            return
        self._register(training_id, record, run_dir)

    def _follow(self, msg: TrainingMessage, run_dir: Path) -> int | None:
        """Publish the recipe's progress and renew the lease until it exits; None when the job was cancelled
        (or ended by a sweep) and the recipe was stopped."""
        assert self.process is not None
        last: dict[str, Any] = {}
        progress_path = run_dir / "progress.json"
        while True:
            returncode = self.process.poll()
            state = self.queue.renew(msg.training_id, self.name, msg)
            self.queue.mark_alive(self.name)
            if state != constants.STATE_RUNNING:
                logger.info("trainer %s: training job %s is %s; stopping its recipe", self.name, msg.training_id,
                            state or "gone")
                self._stop_recipe()
                return None
            progress = read_progress(progress_path)
            if progress is not None and progress != last:
                last = progress
                self.queue.publish(msg.training_id, self.name, **_progress_fields(progress))
            if returncode is not None:
                return returncode
            if self.stop_event.wait(constants.TRAINING_POLL_S):
                raise _Stopped()

    def _stop_recipe(self) -> None:
        """SIGTERM to the recipe's process group, SIGKILL after the grace period; waits for it."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, constants.TRAINING_STOP_GRACE_S), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # whatever it started in its group goes too
            os.killpg(proc.pid, signal.SIGKILL)

    def _register(self, training_id: str, record: dict[str, str], run_dir: Path) -> None:
        """Move the exported model into the models directory under the job's name, with its evaluation."""
        exports = sorted((run_dir / "export").glob("*.onnx"))
        if len(exports) != 1:
            self._fail(training_id, f"the training run ended without exactly one exported model in its export "
                                    f"folder (found {len(exports)}); see the job's trainer.log")
            return
        report = None
        report_path = run_dir / "evaluate" / "report.json"
        try:
            report = json.loads(report_path.read_text())
        except (OSError, ValueError):
            logger.warning("training job %s: no readable evaluate/report.json", training_id)
        if not self.queue.begin_finish(training_id, self.name):
            return  # cancelled between the recipe's end and now
        name = record["name"]
        self.models.root.mkdir(parents=True, exist_ok=True)
        self._pin_default()
        tmp = self.models.root / f"{models_tmp_prefix(training_id)}{uuid.uuid4().hex[:8]}.onnx.tmp"
        shutil.copyfile(exports[0], tmp)
        sha = file_sha256(tmp)
        self.queue.publish(training_id, self.name, model_sha256=sha)  # lets a sweep know a registered model
        summary = evaluation_summary(report, training_id)
        try:
            entry = self.models.add(name, tmp, evaluation=summary)
        except ServiceError as err:
            self._fail(training_id, f"the exported model could not be registered: {err}")
            return
        self.queue.finish(training_id, self.name, constants.STATE_DONE, model=entry.name, model_sha256=entry.sha256,
                          progress="1", evaluation=json.dumps(summary), finishing="0")
        logger.info("trainer %s: training job %s done; model %s registered (%s)", self.name, training_id, entry.name,
                    entry.sha256[:12])

    def _pin_default(self) -> None:
        """Write down today's default model before adding one, so that a new model never becomes the default by
        itself (with no DEFAULT file the first valid name would be the default, and the new name may sort first)."""
        if (self.models.root / constants.DEFAULT_MODEL_FILE).is_file():
            return
        with contextlib.suppress(ServiceError):  # no valid model yet: the new one is the only choice either way
            self.models.set_default(self.models.default())


def _progress_fields(progress: dict[str, Any]) -> dict[str, str]:
    """progress.json as job fields (strings; JSON for the lists and metrics)."""
    out: dict[str, str] = {}
    for key in _PROGRESS_FIELDS:
        value = progress.get(key)
        out[key] = "" if value is None else str(value)
    try:
        out["progress"] = f"{min(1.0, max(0.0, float(progress.get('progress') or 0.0))):.4f}"
    except (TypeError, ValueError):
        out["progress"] = "0"
    out["stages"] = json.dumps(progress.get("stages") or [])
    out["metrics"] = json.dumps(progress.get("metrics") or {}, default=str)
    out["progress_at"] = str(progress.get("updated_at") or "")
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m service.jobs.trainer` (and `pixelcam trainer`): work until SIGTERM or SIGINT."""
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trainer = Trainer(settings)

    def stop(signum: int, frame: object) -> None:
        logger.info("trainer %s: signal %d, stopping (a running job is stopped and failed)", trainer.name, signum)
        trainer.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    trainer.run(burst=bool(argv and "--burst" in argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
