"""The built-in web viewer: `/` (upload and recent jobs), `/viewer/{slide_id}?job=` and its static files.

OpenSeadragon comes from its npm package (`npm install` in `scripts/setup.sh`), served from
`node_modules/openseadragon/build/openseadragon/`; it is never copied into the repository. The API docs at
`/docs` are Swagger UI from the `swagger-ui-dist` npm package in the same way, so they work offline.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from service.api.deps import SlideStoreDep
from service.errors import NotFoundError

logger = logging.getLogger(__name__)

__all__ = ["STATIC_DIR", "osd_dir", "router", "swagger_dir"]

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"  # service/static
_REPO_ROOT = Path(__file__).resolve().parents[3]  # above the service package
_MEDIA = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".png": "image/png",
          ".svg": "image/svg+xml", ".map": "application/json"}

router = APIRouter(tags=["viewer"], include_in_schema=False)


class AssetNotFound(NotFoundError):
    """A viewer asset that does not exist (or OpenSeadragon is not installed)."""


def osd_dir() -> Path:
    """Where OpenSeadragon's build lies after `npm install` at the repository root."""
    return _REPO_ROOT / "node_modules" / "openseadragon" / "build" / "openseadragon"


def swagger_dir() -> Path:
    """Where Swagger UI's files lie after `npm install` at the repository root."""
    return _REPO_ROOT / "node_modules" / "swagger-ui-dist"


def _file_under(root: Path, relative: str) -> Path:
    """`root/relative` if it is a file inside `root` (no escaping with `..` or links), else AssetNotFound."""
    base = root.resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base) or not target.is_file():
        raise AssetNotFound(f"no viewer asset {relative!r}")
    return target


def _asset(root: Path, relative: str, cache_control: str) -> FileResponse:
    """A file under `root` with its media type and caching header."""
    path = _file_under(root, relative)
    return FileResponse(path, media_type=_MEDIA.get(path.suffix, "application/octet-stream"),
                        headers={"Cache-Control": cache_control})


@router.get("/", response_class=HTMLResponse)
def index() -> FileResponse:
    """The start page: upload a slide to analyse, recent jobs."""
    return _asset(STATIC_DIR, "index.html", "no-cache")


@router.get("/viewer", response_class=RedirectResponse)
def viewer_root() -> RedirectResponse:
    """Back to the start page (a slide id is needed)."""
    return RedirectResponse("/")


@router.get("/viewer/{slide_id}", response_class=HTMLResponse)
def viewer(slide_id: str, store: SlideStoreDep) -> FileResponse:
    """The slide viewer; `?job=<id>` adds the job's heatmap overlay, outlines, progress and result."""
    store.get(slide_id)  # 404 with a clear message for unknown slides
    return _asset(STATIC_DIR, "viewer.html", "no-cache")


@router.get("/static/openseadragon/{path:path}")
def openseadragon_asset(path: str) -> FileResponse:
    """OpenSeadragon's files from its npm package."""
    if not osd_dir().is_dir():
        raise AssetNotFound(
            f"OpenSeadragon is not installed at {osd_dir()}; run `npm install` at the repository root "
            "(scripts/setup.sh does it)"
        )
    return _asset(osd_dir(), path, "public, max-age=86400")


@router.get("/docs", response_class=HTMLResponse)
def api_docs() -> HTMLResponse:
    """Swagger UI over /openapi.json, with its scripts served here (no CDN)."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title="pixelcam API",
                               swagger_js_url="/static/swagger/swagger-ui-bundle.js",
                               swagger_css_url="/static/swagger/swagger-ui.css",
                               swagger_favicon_url="/static/swagger/favicon-32x32.png")


@router.get("/static/swagger/{path:path}")
def swagger_asset(path: str) -> FileResponse:
    """Swagger UI's files from its npm package."""
    if not swagger_dir().is_dir():
        raise AssetNotFound(f"Swagger UI is not installed at {swagger_dir()}; run `npm install` at the repository "
                            "root (scripts/setup.sh does it)")
    return _asset(swagger_dir(), path, "public, max-age=86400")


@router.get("/static/viewer/{path:path}")
def viewer_asset(path: str) -> FileResponse:
    """The viewer's own scripts and styles."""
    return _asset(STATIC_DIR, path, "no-cache")
