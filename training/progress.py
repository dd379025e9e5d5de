"""`<run_dir>/progress.json`: where a run is, for whoever follows it (the service's trainer, a shell loop).

The file is replaced atomically (write to a temporary file, then `os.replace`), so a reader never sees half of it:

    {"stage": "baseline", "stages": [...], "stage_index": 1, "epoch": 3, "epochs": 20, "progress": 0.31,
     "metrics": {"valcl_acc": 95.0, "valpx_pxap": 71.2}, "message": "...", "state": "running",
     "updated_at": 1764820000.0}

`progress` is the share of the whole run done (0..1), from fixed stage weights; `state` is "running", "done" or
"failed" (with `message` saying why).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["PROGRESS_FILE", "STAGE_WEIGHTS", "RunProgress", "read_progress"]

PROGRESS_FILE = "progress.json"
# rough shares of a run's wall time per stage (measured on the GlaS recipe; extraction only with slides)
STAGE_WEIGHTS = {"extract": 0.10, "baseline": 0.35, "cams": 0.04, "pixelcam": 0.35, "evaluate": 0.06,
                 "export": 0.10}
MIN_INTERVAL_S = 0.5  # step updates are written at most this often; stage and epoch changes always


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunProgress:
    """Writes progress.json as the run goes through `stages` (a subset of STAGE_WEIGHTS, in order)."""

    def __init__(self, run_dir: str | Path, stages: tuple[str, ...]) -> None:
        self.path = Path(run_dir) / PROGRESS_FILE
        self.stages = tuple(s for s in stages if s in STAGE_WEIGHTS)
        total = sum(STAGE_WEIGHTS[s] for s in self.stages) or 1.0
        self._weights = {s: STAGE_WEIGHTS[s] / total for s in self.stages}
        self._doc: dict[str, Any] = {"stage": None, "stages": list(self.stages), "stage_index": -1, "epoch": None,
                                     "epochs": None, "progress": 0.0, "metrics": {}, "message": "",
                                     "state": "running"}
        self._last_write = 0.0

    def _base(self, stage: str) -> float:
        done = self.stages[: self.stages.index(stage)] if stage in self.stages else ()
        return sum(self._weights[s] for s in done)

    def start(self, stage: str, message: str = "") -> None:
        """A stage begins."""
        self._doc.update(stage=stage, stage_index=self.stages.index(stage) if stage in self.stages else -1,
                         epoch=None, epochs=None, message=message, progress=round(self._base(stage), 4))
        self._write()

    def update(self, fraction: float, *, epoch: int | None = None, epochs: int | None = None,
               metrics: dict[str, Any] | None = None, message: str | None = None, force: bool = False) -> None:
        """`fraction` (0..1) of the current stage is done; writes at most every MIN_INTERVAL_S unless forced."""
        stage = self._doc["stage"]
        if stage is None:
            return
        share = self._weights.get(stage, 0.0)
        self._doc["progress"] = round(min(1.0, self._base(stage) + share * min(max(fraction, 0.0), 1.0)), 4)
        if epoch is not None:
            self._doc["epoch"], self._doc["epochs"] = epoch, epochs
        if metrics:
            self._doc["metrics"] = {**self._doc["metrics"], **{k: _plain(v) for k, v in metrics.items()}}
        if message is not None:
            self._doc["message"] = message
        now = time.monotonic()
        if force or now - self._last_write >= MIN_INTERVAL_S:
            self._write()

    def finish(self, state: str = "done", message: str = "") -> None:
        """The run ended: "done" (progress 1) or "failed" (message says why)."""
        self._doc.update(state=state, message=message)
        if state == "done":
            self._doc["progress"] = 1.0
        self._write()

    def _write(self) -> None:
        self._last_write = time.monotonic()
        self._doc["updated_at"] = round(time.time(), 3)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{PROGRESS_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._doc), encoding="utf-8")
        os.replace(tmp, self.path)


def read_progress(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's progress.json, or None when it has none yet."""
    try:
        doc: dict[str, Any] = json.loads((Path(run_dir) / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc
