"""Per-stage reports: `report.json` (all numbers) and a readable `summary.md` in the stage's folder."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_report(folder: Path, report: dict[str, Any], summary_md: str) -> None:
    """Write report.json and summary.md into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(_clean(report), indent=2, sort_keys=False) + "\n")
    (folder / "summary.md").write_text(summary_md.rstrip() + "\n")
    logger.info("wrote %s/report.json and summary.md", folder)


def read_report(folder: Path) -> dict[str, Any]:
    """Read a stage's report.json (empty dict when the stage has not run)."""
    path = folder / "report.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def fmt(value: Any, digits: int = 2) -> str:
    """A number for a Markdown table ('n/a' for None/NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def training_summary(stage: str, report: dict[str, Any]) -> str:
    """summary.md of a training stage: selection, speed and the validation history."""
    rows = [
        [h["epoch"], h.get("loss"), h.get("ce"), h.get("pce"), h.get("valcl_acc"), h.get("valpx_pxap")]
        for h in report["history"]
    ]
    return "\n\n".join(
        [
            f"# Stage {stage}",
            f"Map judged on valpx: `{report['map_mode']}`. Epochs: {report['epochs']}, "
            f"train images seen: {report['train_images']}, training time: {fmt(report['train_time_s'], 1)} s, "
            f"speed: {fmt(report['train_images_per_s'])} images/s (wall time of the stage "
            f"{fmt(report['wall_s'], 1)} s).",
            f"best_classification: epoch {report['best_classification_epoch']} "
            f"(valcl accuracy {fmt(report['best_valcl_acc'])} %); best_localization: epoch "
            f"{report['best_localization_epoch']} (valpx PxAP {fmt(report['best_valpx_pxap'])} %).",
            table(["epoch", "loss", "CE", "partial CE", "valcl acc %", "valpx PxAP %"], rows),
        ]
    )
