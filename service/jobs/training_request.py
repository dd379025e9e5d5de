"""A training request checked against the storage, and the job folder it becomes.

The checks that need no trainer run at submit (so a bad request is a 4xx, never a failed job): every slide is
stored (and the caller's), no slide twice, each label is one of the config's classes and every class has a slide,
each slide has a physical scale (its own or the request's `mpp`), and an annotation is a GeoJSON FeatureCollection
with at least one readable polygon that lies on the slide (level-0 pixels, the frame QuPath exports).

The folder `<storage>/training/<id>/` is written whole (into a hidden temporary folder, then renamed): the request
as `request.json` and each slide's annotations as `annotations/<n>.geojson`. Redis only ever holds ids and state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from service.errors import InvalidRequest, ServiceError, SlideNotFound
from service.jobs.storage import SlideStore, is_model_name, remove_tree
from service.jobs.training_config import resolve_config
from service.outputs.annotations import AnnotationError, parse_annotations

logger = logging.getLogger(__name__)

__all__ = ["TrainingSlide", "TrainingRequest", "check_request", "check_annotations", "training_dir",
           "write_job_folder", "remove_training_files", "REQUEST_FILE"]

REQUEST_FILE = "request.json"
_ID_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclasses.dataclass(frozen=True)
class TrainingSlide:
    """One slide of a request: its id, class, optional annotations (GeoJSON) and optional mpp override."""

    slide_id: str
    label: str
    annotations: Any = None  # a GeoJSON FeatureCollection
    mpp: float | None = None


@dataclasses.dataclass(frozen=True)
class TrainingRequest:
    """A checked request: its slides, the request's config fields, the resolved config, the model name."""

    slides: tuple[TrainingSlide, ...]
    config: dict[str, Any]
    resolved: dict[str, Any]
    name: str


def training_dir(root: Path, training_id: str) -> Path:
    """The folder of one training job; refuses anything that is not a training id."""
    if not _ID_RE.match(training_id):
        raise ServiceError(f"{training_id!r} is not a training job id (32 hex digits)")
    return Path(root) / training_id


def check_annotations(doc: Any, where: str, slide_size_wh: Sequence[int] | None = None) -> int:
    """The number of polygons of a GeoJSON FeatureCollection (read as the recipe reads it); InvalidRequest
    saying what is wrong with it: not a FeatureCollection, no polygon, an unreadable ring, or no polygon on the
    slide (the coordinates must be the slide's level-0 pixels)."""
    if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection":
        got = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
        raise InvalidRequest(f"{where} must be a GeoJSON FeatureCollection (QuPath: File > Export objects as "
                             f"GeoJSON, with 'Export as FeatureCollection'); got {got!r}")
    try:
        polygons = parse_annotations(doc, source=where)
    except AnnotationError as err:
        raise InvalidRequest(str(err)) from err
    if slide_size_wh is not None:
        w, h = (float(v) for v in slide_size_wh)
        boxes = [p.l0_bbox for p in polygons]
        if not any(x0 < w and y0 < h and x1 > 0 and y1 > 0 for x0, y0, x1, y1 in boxes):
            x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
            raise InvalidRequest(f"{where}: no polygon lies on the slide ({w:.0f} x {h:.0f} level-0 pixels; the "
                                 f"polygons start at x={x0:.0f}, y={y0:.0f}); the coordinates must be level-0 "
                                 "pixels of this slide, as QuPath exports them")
    return len(polygons)


def check_request(slides_in: Sequence[TrainingSlide], config: dict[str, Any], name: str, store: SlideStore,
                  may_use: Callable[[str], bool]) -> TrainingRequest:
    """Check a request against the config and the stored slides; InvalidRequest or SlideNotFound with the reason.

    `may_use(slide_id)` says whether the caller may train on that slide (its key uploaded it).
    """
    resolved = resolve_config(config)
    classes = [str(c) for c in resolved.get("class_names", [])]
    if not is_model_name(name):
        raise InvalidRequest(f"name {name!r} is not a usable model name: 1 to 100 letters, digits, '.', '_' or "
                             "'-', starting with a letter or digit")
    seen: dict[str, int] = {}
    for i, item in enumerate(slides_in):
        where = f"slides[{i}]"
        if item.slide_id in seen:
            raise InvalidRequest(f"{where}.slide_id {item.slide_id} is slides[{seen[item.slide_id]}] again; give "
                                 "each slide once")
        seen[item.slide_id] = i
        if not may_use(item.slide_id):
            raise SlideNotFound(f"{where}.slide_id: no slide {item.slide_id}; upload it with POST /v1/slides")
        try:
            record = store.get(item.slide_id)
        except SlideNotFound as err:
            raise SlideNotFound(f"{where}.slide_id: {err}") from err
        if item.label not in classes:
            raise InvalidRequest(f"{where}.label {item.label!r} is not one of the config's classes {classes} "
                                 "(set config.class_names to train other classes)")
        if item.mpp is None and record.info.get("mpp_x") is None:
            raise InvalidRequest(f"{where}: slide {item.slide_id} has no microns-per-pixel in its metadata; give "
                                 "it with \"mpp\"")
        if item.annotations is not None:
            check_annotations(item.annotations, f"{where}.annotations", record.info.get("l0_size_wh"))
    counts = {c: sum(1 for s in slides_in if s.label == c) for c in classes}
    missing = [c for c, n in counts.items() if n == 0]
    if missing:
        raise InvalidRequest(f"no slide of class {', '.join(repr(c) for c in missing)}: the model learns to tell "
                             f"{classes} apart and needs slides of every class (given: "
                             f"{', '.join(f'{c} {n}' for c, n in counts.items())})")
    return TrainingRequest(tuple(slides_in), dict(config), resolved, name)


def write_job_folder(root: Path, training_id: str, request: TrainingRequest) -> Path:
    """Write the job's folder whole (request.json, annotations/*.geojson): a hidden folder renamed into place."""
    final = training_dir(root, training_id)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".new-{training_id}-{uuid.uuid4().hex[:8]}"
    try:
        (tmp / "annotations").mkdir(parents=True)
        slides = []
        for i, item in enumerate(request.slides):
            annotations = ""
            if item.annotations is not None:
                annotations = f"annotations/{i}.geojson"
                (tmp / annotations).write_text(json.dumps(item.annotations, separators=(",", ":")))
            slides.append({"slide_id": item.slide_id, "label": item.label, "annotations": annotations,
                           "mpp": item.mpp})
        doc = {"training_id": training_id, "name": request.name, "slides": slides, "config": request.config}
        (tmp / REQUEST_FILE).write_text(json.dumps(doc, indent=1))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_training_files(root: Path, training_id: str) -> None:
    """Delete a training job's folder (request, manifest, the recipe's run with its checkpoints and tile cache)."""
    with contextlib.suppress(FileNotFoundError):
        remove_tree(training_dir(root, training_id))
