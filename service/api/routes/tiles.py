"""Deep Zoom routes: slide and heatmap-overlay descriptors and tiles, with cached slide handles and tiles.

Slides: `/v1/slides/{id}.dzi`, `/v1/slides/{id}_files/{level}/{col}_{row}.{jpeg|jpg|png}` and
`/v1/slides/{id}/deepzoom` (size, MPP for the scale bar). Overlays: `/v1/jobs/{id}/overlay.dzi` and
`/v1/jobs/{id}/overlay_files/{level}/{col}_{row}.png?cmap=&threshold=`, in the slide's DZI geometry, showing the
chunks already done while the job runs. Ids resolve to paths only through the slide store and `job_dir`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam

from service import constants
from service.analysis.pipeline import partial_heatmap
from service.api.deps import QueueDep, SettingsDep, SlideStoreDep
from service.api.schemas import ErrorPublic, file_response
from service.errors import InvalidRequest, NotFoundError, ResultNotReady
from service.jobs.storage import SlideStore, job_dir
from service.lru import LRUCache
from service.outputs.deepzoom import (
    COLORMAPS,
    ArrayHeatmap,
    DeepZoomError,
    DeepZoomGeometry,
    HeatmapSource,
    TiffHeatmap,
    TileOutOfRangeError,
    dzi_xml,
    encode_tile,
    render_overlay_tile,
    render_slide_tile,
)
from service.settings import Settings
from service.slide.errors import MissingMppError, SlideError
from service.slide.wsi import Slide, SlideInfo, open_slide

logger = logging.getLogger(__name__)

__all__ = ["TILE_SIZE", "OVERLAP", "SlidePool", "TileNotFound", "TileState", "heatmap_for", "load_heatmap", "router"]

TILE_SIZE = 254
OVERLAP = 1
SLIDE_CACHE_CONTROL = "public, max-age=86400"  # slides are content-addressed: a tile never changes
DONE_CACHE_CONTROL = "public, max-age=3600"
LIVE_CACHE_CONTROL = "no-cache"  # a running job's overlay fills in: revalidate every time (ETag makes it cheap)

router = APIRouter(tags=["tiles"])

_ERRORS: dict[int | str, dict[str, Any]] = {404: {"model": ErrorPublic}, 409: {"model": ErrorPublic},
                                            422: {"model": ErrorPublic}}


class TileNotFound(NotFoundError):
    """The Deep Zoom level or tile does not exist for this image."""


@dataclass(frozen=True)
class _SlideEntry:
    info: SlideInfo
    mpp_known: bool
    idle: list[Slide]


class SlidePool:
    """Thread-safe LRU of open slides; each keeps a few idle handles, since one `Slide` serves one thread."""

    def __init__(self, max_slides: int = 16, max_idle_per_slide: int = 4) -> None:
        self.max_slides = max_slides
        self.max_idle_per_slide = max_idle_per_slide
        self._lock = threading.Lock()  # guards the idle lists
        self._entries: LRUCache[Path, _SlideEntry] = LRUCache(max_items=max_slides, on_evict=self._dropped)

    @staticmethod
    def _open(path: Path) -> tuple[Slide, bool]:
        """Open a slide; one without a usable MPP still has pixels to show (no scale bar then)."""
        try:
            return open_slide(path), True
        except MissingMppError:
            return open_slide(path, mpp_override=1.0), False

    def _entry(self, path: Path) -> _SlideEntry:
        entry = self._entries.get(path)
        if entry is not None:
            return entry
        slide, mpp_known = self._open(path)
        entry = self._entries.setdefault(path, _SlideEntry(slide.info, mpp_known, []))
        self._give_back(path, entry, slide)
        return entry

    def _give_back(self, path: Path, entry: _SlideEntry, slide: Slide) -> None:
        """Keep `slide` as an idle handle of its entry if the entry is still pooled and has room, else close it."""
        with self._lock:
            keep = self._entries.peek(path) is entry and len(entry.idle) < self.max_idle_per_slide
            if keep:
                entry.idle.append(slide)
        if not keep:
            slide.close()

    def _dropped(self, path: Path, entry: _SlideEntry) -> None:
        """An entry left the pool: close its idle handles (borrowed ones close when given back)."""
        with self._lock:
            handles = list(entry.idle)
            entry.idle.clear()
        for handle in handles:
            handle.close()

    def info(self, path: Path) -> tuple[SlideInfo, bool]:
        """The slide's info and whether its MPP came from the file (False: opened with a placeholder)."""
        entry = self._entry(path)
        return entry.info, entry.mpp_known

    @contextmanager
    def borrow(self, path: Path) -> Iterator[Slide]:
        """An open handle for this thread's exclusive use, returned to the pool afterwards."""
        entry = self._entry(path)
        with self._lock:
            slide = entry.idle.pop() if entry.idle else None
        if slide is None:
            slide, _ = self._open(path)
        try:
            yield slide
        finally:
            self._give_back(path, entry, slide)

    def forget(self, match: Callable[[Path], bool]) -> int:
        """Close and drop the slides whose path matches (handles still borrowed close when given back)."""
        dropped = 0
        for path, entry in self._entries.items():
            if match(path) and self._entries.pop(path) is not None:
                self._dropped(path, entry)
                dropped += 1
        return dropped

    def close(self) -> None:
        """Close every idle handle."""
        self._entries.clear()


@dataclass
class TileState:
    """What the tile routes keep between requests: open slides and the byte-bounded caches."""

    slides: SlidePool = field(default_factory=SlidePool)
    # encoded slide tiles (zoomed-out tiles of single-level slides are costly to render)
    slide_tiles: LRUCache[tuple[Any, ...], Any] = field(default_factory=lambda: LRUCache(max_size=128 << 20))
    # encoded overlay tiles
    tiles: LRUCache[tuple[Any, ...], Any] = field(default_factory=lambda: LRUCache(max_size=64 << 20))
    # decoded heatmap sources of jobs, keyed by job version
    heatmaps: LRUCache[tuple[Any, ...], Any] = field(default_factory=lambda: LRUCache(max_size=512 << 20))
    # slide id -> path (store lookups read info.json)
    slide_paths: LRUCache[tuple[Any, ...], Any] = field(default_factory=lambda: LRUCache(max_size=1 << 20))
    lock: threading.Lock = field(default_factory=threading.Lock)
    loading: dict[tuple[str, ...], threading.Lock] = field(default_factory=dict)  # one load per job version


def forget_cached(state: TileState, *ids: str) -> int:
    """Drop every cached tile, heatmap source, path and open handle that belongs to these slide or job ids."""
    wanted = set(ids)
    dropped = 0
    for cache in (state.slide_tiles, state.tiles, state.heatmaps, state.slide_paths):
        for key, _ in cache.items():
            if wanted.intersection(str(part) for part in key):
                cache.pop(key)
                dropped += 1
    return dropped + state.slides.forget(lambda path: bool(wanted.intersection(path.parts)))


_STATE_LOCK = threading.Lock()
# Tile renders are CPU work: at most a few at once, so that a burst of viewer requests on a small machine leaves
# the API's threads (and the GIL) free to answer everything else; cache hits never wait here.
_RENDER_SLOTS = threading.BoundedSemaphore(max(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                               else (os.cpu_count() or 2)))


def get_tile_state(request: Request) -> TileState:
    """The app's tile caches, created on first use (no lifespan hook needed)."""
    state = getattr(request.app.state, "tiles", None)
    if state is None:
        with _STATE_LOCK:
            state = getattr(request.app.state, "tiles", None)
            if state is None:
                state = TileState()
                request.app.state.tiles = state
    return state  # type: ignore[no-any-return]


TileStateDep = Annotated[TileState, Depends(get_tile_state)]


def _slide_path(state: TileState, store: SlideStore, slide_id: str) -> Path:
    """The stored slide's file (SlideNotFound for unknown ids)."""
    cached = state.slide_paths.get((slide_id,))
    if cached is None:
        cached = store.get(slide_id).path
        state.slide_paths.put((slide_id,), cached, size=256)
    return cached  # type: ignore[no-any-return]


def _etag(*parts: object) -> str:
    """A strong ETag naming exactly what a response depends on."""
    return '"' + hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:32] + '"'


def _not_modified(request: Request, etag: str) -> bool:
    """True when the client's If-None-Match already names this ETag."""
    header = request.headers.get("if-none-match", "")
    return any(tag.strip() in (etag, f"W/{etag}", "*") for tag in header.split(",")) if header else False


def _cached_response(request: Request, etag: str, cache_control: str, media_type: str,
                     produce: Callable[[], bytes]) -> Response:
    """304 when the client has this version, else the bytes `produce` makes, with ETag and Cache-Control."""
    headers = {"ETag": etag, "Cache-Control": cache_control}
    if _not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    return Response(produce(), media_type=media_type, headers=headers)


def _tile(geometry: DeepZoomGeometry, level: int, col: int, row: int) -> None:
    """TileNotFound (404) for a level or tile outside the pyramid."""
    try:
        geometry.tile_region(level, col, row)
    except TileOutOfRangeError as err:
        raise TileNotFound(str(err)) from err


LevelParam = Annotated[int, PathParam(ge=0, le=64, description="Deep Zoom level (0 is 1x1 px)")]
ColParam = Annotated[int, PathParam(ge=0, description="tile column")]
RowParam = Annotated[int, PathParam(ge=0, description="tile row")]


@router.get("/v1/slides/{slide_id}.dzi", responses={**_ERRORS, **file_response("Deep Zoom descriptor", "application/xml")},
            response_class=Response)
def slide_dzi(slide_id: str, request: Request, store: SlideStoreDep, state: TileStateDep) -> Response:
    """Deep Zoom descriptor (XML) of a slide: level-0 size, tile 254, overlap 1, JPEG."""
    info, _ = state.slides.info(_slide_path(state, store, slide_id))
    xml = dzi_xml(info.l0_size_wh, TILE_SIZE, OVERLAP, "jpeg")
    return _cached_response(request, _etag("dzi", slide_id, TILE_SIZE, OVERLAP), SLIDE_CACHE_CONTROL,
                            "application/xml", xml.encode)


@router.get("/v1/slides/{slide_id}_files/{level}/{col}_{row}.{fmt}",
            responses={**_ERRORS, **file_response("a Deep Zoom tile of the slide", "image/jpeg", "image/png")},
            response_class=Response)
def slide_tile(slide_id: str, level: LevelParam, col: ColParam, row: RowParam, fmt: Literal["jpeg", "jpg", "png"],
               request: Request, store: SlideStoreDep, state: TileStateDep) -> Response:
    """One Deep Zoom tile of a slide, read from the best pyramid level."""
    path = _slide_path(state, store, slide_id)
    info, _ = state.slides.info(path)
    geometry = DeepZoomGeometry(info.l0_size_wh, TILE_SIZE, OVERLAP)
    _tile(geometry, level, col, row)
    kind: Literal["jpeg", "png"] = "png" if fmt == "png" else "jpeg"

    key = (slide_id, level, col, row, kind)

    def produce() -> bytes:
        cached = state.slide_tiles.get(key)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        with _RENDER_SLOTS, state.slides.borrow(path) as slide:
            try:
                pixels = render_slide_tile(slide, geometry, level, col, row)
            except SlideError as err:
                raise InvalidRequest(f"slide {slide_id} could not be read at tile {level}/{col}_{row}: {err}") from err
            data = encode_tile(pixels, kind)
        state.slide_tiles.put(key, data, size=len(data))
        return data

    return _cached_response(request, _etag("slide", slide_id, TILE_SIZE, OVERLAP, level, col, row, kind),
                            SLIDE_CACHE_CONTROL, f"image/{kind}", produce)


def _mpp(info: SlideInfo, mpp_known: bool) -> tuple[float | None, float | None]:
    """Microns per pixel, or None when the file has none (the slide was opened with a placeholder)."""
    return (info.mpp_x, info.mpp_y) if mpp_known else (None, None)


@router.get("/v1/slides/{slide_id}/deepzoom", responses=_ERRORS)
def slide_deepzoom(slide_id: str, store: SlideStoreDep, state: TileStateDep) -> dict[str, Any]:
    """What a viewer needs: the DZI URL, level-0 size, levels, and microns per pixel for the scale bar."""
    info, mpp_known = state.slides.info(_slide_path(state, store, slide_id))
    geometry = DeepZoomGeometry(info.l0_size_wh, TILE_SIZE, OVERLAP)
    mpp_x, mpp_y = _mpp(info, mpp_known)
    return {
        "slide_id": slide_id, "dzi": f"/v1/slides/{slide_id}.dzi", "width": info.l0_size_wh[0],
        "height": info.l0_size_wh[1], "tile_size": TILE_SIZE, "overlap": OVERLAP, "format": "jpeg",
        "level_count": geometry.level_count,  # Deep Zoom levels (what a DZI client counts)
        "slide_level_count": info.level_count,  # the slide file's own pyramid levels
        "slide_level_sizes_wh": [list(wh) for wh in info.level_sizes_wh],
        "mpp_x": mpp_x, "mpp_y": mpp_y,
        "mpp_source": info.mpp_source if mpp_known else None,
        "pixels_per_meter": (1e6 / ((mpp_x + (mpp_y or mpp_x)) / 2)) if mpp_x else None,
        "objective_power": info.objective_power, "vendor": info.vendor, "name": info.name,
    }


# --- heatmap overlays --------------------------------------------------------------------------------------------


def _job_version(record: dict[str, str]) -> tuple[str, ...]:
    """What changes whenever the overlay can change: the run (generation), its state and the chunks done."""
    return (record.get("generation", "0"), record.get("state", ""), record.get("chunks_done", "0"))


def _hm_downsample(folder: Path) -> float:
    """The heatmap's declared downsample: `heatmap.hm_downsample` of the job's result.json."""
    try:
        return float(json.loads((folder / "result.json").read_text())["heatmap"]["hm_downsample"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ResultNotReady(
            f"job {folder.name} has a heatmap but no readable heatmap.hm_downsample in result.json; resubmit it"
        ) from err


def load_heatmap(folder: Path, record: dict[str, str]) -> HeatmapSource | None:
    """The finished heatmap TIFF, else a partial heatmap stitched from the chunk files present; None if none."""
    tif = folder / "heatmap.tif"
    if record.get("state") == constants.STATE_DONE and tif.is_file():
        return TiffHeatmap(tif, _hm_downsample(folder))
    partial = partial_heatmap(folder)
    if partial is None:
        return None
    probs, hm_downsample = partial
    return ArrayHeatmap(probs, hm_downsample)


def _overlay_context(job_id: str, queue: QueueDep, settings: Settings, store: SlideStore,
                     state: TileState) -> tuple[dict[str, str], Path, DeepZoomGeometry]:
    """The job's record, its folder and its slide's DZI geometry (JobNotFound / SlideNotFound as 404)."""
    record = queue.get(job_id)
    folder = job_dir(settings.jobs_dir, job_id)
    info, _ = state.slides.info(_slide_path(state, store, record["slide_id"]))
    return record, folder, DeepZoomGeometry(info.l0_size_wh, TILE_SIZE, OVERLAP)


CmapQuery = Annotated[str, Query(description=f"colour map: one of {', '.join(COLORMAPS)}")]
ThresholdQuery = Annotated[float, Query(ge=0.0, le=1.0, description="probabilities below it are transparent")]


def _check_cmap(cmap: str) -> None:
    """422 for a colour map the renderer does not have."""
    if cmap not in COLORMAPS:
        raise InvalidRequest(f"unknown colour map {cmap!r}; choose one of {', '.join(COLORMAPS)}")


@router.get("/v1/jobs/{job_id}/overlay.dzi",
            responses={**_ERRORS, **file_response("Deep Zoom descriptor of the heatmap overlay", "application/xml")},
            response_class=Response)
def overlay_dzi(job_id: str, request: Request, queue: QueueDep, settings: SettingsDep, store: SlideStoreDep,
                state: TileStateDep, cmap: CmapQuery = "jet", threshold: ThresholdQuery = 0.5) -> Response:
    """Deep Zoom descriptor of the job's heatmap overlay: the slide's level-0 size, transparent PNG tiles."""
    _check_cmap(cmap)
    record, _, geometry = _overlay_context(job_id, queue, settings, store, state)
    xml = dzi_xml(geometry.l0_size_wh, TILE_SIZE, OVERLAP, "png")
    return _cached_response(request, _etag("overlay-dzi", job_id, record.get("slide_id")), SLIDE_CACHE_CONTROL,
                            "application/xml", xml.encode)


@router.get("/v1/jobs/{job_id}/overlay_files/{level}/{col}_{row}.png",
            responses={**_ERRORS, **file_response("a transparent Deep Zoom tile of the heatmap", "image/png")},
            response_class=Response)
def overlay_tile(job_id: str, level: LevelParam, col: ColParam, row: RowParam, request: Request, queue: QueueDep,
                 settings: SettingsDep, store: SlideStoreDep, state: TileStateDep, cmap: CmapQuery = "jet",
                 threshold: ThresholdQuery = 0.5) -> Response:
    """One transparent PNG tile of the heatmap overlay; while the job runs it shows the chunks already done."""
    _check_cmap(cmap)
    record, folder, geometry = _overlay_context(job_id, queue, settings, store, state)
    _tile(geometry, level, col, row)
    version = _job_version(record)
    done = record.get("state") == constants.STATE_DONE
    key = (job_id, *version, level, col, row, cmap, round(threshold, 4))

    def produce() -> bytes:
        cached = state.tiles.get(key)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        source = heatmap_for(state, (job_id, *version), folder, record)
        if source is _EMPTY:
            data = _blank_png(geometry, level, col, row)
        else:
            try:
                rgba = render_overlay_tile(source, geometry, level, col, row, cmap=cmap, threshold=threshold)
            except DeepZoomError as err:
                raise InvalidRequest(str(err)) from err
            data = encode_tile(rgba, "png")
        state.tiles.put(key, data, size=len(data))
        return data

    return _cached_response(request, _etag("overlay", *key), DONE_CACHE_CONTROL if done else LIVE_CACHE_CONTROL,
                            "image/png", produce)


_EMPTY = object()


def heatmap_for(state: TileState, key: tuple[str, ...], folder: Path, record: dict[str, str]) -> Any:
    """The job version's heatmap source (or `_EMPTY`), loaded once even when many tiles ask at the same time."""
    source = state.heatmaps.get(key)
    if source is not None:
        return source
    with state.lock:
        lock = state.loading.setdefault(key, threading.Lock())
    with lock:  # a running job's partial heatmap is stitched from all its chunk files: do it once per version
        source = state.heatmaps.get(key)
        if source is None:
            loaded = load_heatmap(folder, record)
            source = _EMPTY if loaded is None else loaded
            state.heatmaps.put(key, source, size=1 << 16 if loaded is None else _source_bytes(loaded))
    with state.lock:
        state.loading.pop(key, None)
    return source


def _source_bytes(source: HeatmapSource) -> int:
    """Approximate memory held by a heatmap source (its pyramid's cells)."""
    w, h = source.level_size_wh(0)
    return max(1 << 16, int(w * h * 4 * 1.34))


def _blank_png(geometry: DeepZoomGeometry, level: int, col: int, row: int) -> bytes:
    """A fully transparent tile of the right size (nothing analysed yet)."""
    w, h = geometry.tile_region(level, col, row).dz_size_wh
    return encode_tile(np.zeros((h, w, 4), np.uint8), "png")
