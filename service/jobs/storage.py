"""Shared storage: uploaded slides (content-addressed), the models directory and the job output folders.

Layout under the storage dir: `slides/<sha256>/slide<ext>` + `info.json`, `jobs/<job_id>/` (the analysis core
writes there), `models/<name>.onnx` + `DEFAULT`. No path is ever built from user input: a slide's id is the hash
of its bytes and only a whitelisted extension survives from the uploaded file name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import re
import resource
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from model.errors import InvalidModelError
from model.runtime import read_model_metadata
from service import constants
from service.analysis.plan import file_sha256
from service.errors import (
    InvalidUpload,
    ModelNotFound,
    ModelUnavailable,
    ServiceError,
    SlideNotFound,
    UploadTooLarge,
)
from service.slide.errors import MissingMppError, SlideError
from service.slide.wsi import open_slide

logger = logging.getLogger(__name__)

__all__ = ["SlideStore", "SlideRecord", "Upload", "ModelRegistry", "ModelEntry", "safe_extension", "job_dir",
           "is_sha256", "inspect_isolated", "validate_here", "is_model_name", "MODEL_NAME_PATTERN"]

_EXT_RE = re.compile(r"^\.[a-z0-9]{1,10}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_JOB_RE = re.compile(r"^[0-9a-f]{16,64}$")
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MODEL_NAME_PATTERN = _MODEL_RE.pattern  # a model's name (its file's stem): what the API's schemas accept
# formats whose slide is a set of files: the named file alone can never be opened
_MULTI_FILE = {".mrxs": "3DHISTECH MIRAX (.mrxs + a folder of .dat files)",
               ".vms": "Hamamatsu VMS (.vms + its JPEG files)", ".vmu": "Hamamatsu VMU (.vmu + its data files)"}


def is_sha256(text: str) -> bool:
    """True for 64 lowercase hex digits."""
    return bool(_SHA_RE.match(text))


def is_model_name(text: str) -> bool:
    """True for a name the models directory accepts (letters, digits, '.', '_', '-'; 1 to 100 characters)."""
    return bool(_MODEL_RE.match(text))


def safe_extension(filename: str | None) -> str:
    """The file's extension if it is short and alphanumeric (slide readers look at it), else an empty string."""
    if not filename:
        return ""
    suffix = Path(filename.replace("\\", "/")).suffix.lower()
    return suffix if _EXT_RE.match(suffix) else ""


def job_dir(jobs_root: Path, job_id: str) -> Path:
    """The output folder of a job; refuses anything that is not a job id."""
    if not _JOB_RE.match(job_id):
        raise ServiceError(f"{job_id!r} is not a job id (lowercase hex)")
    return jobs_root / job_id


def remove_tree(folder: Path) -> None:
    """Delete a folder for good: renamed aside first (so no reader finds it half-deleted), then removed."""
    if not folder.exists():
        return
    doomed = folder.with_name(f".deleting-{folder.name}-{os.getpid()}-{time.monotonic_ns()}")
    folder.rename(doomed)
    shutil.rmtree(doomed)


def remove_job_files(jobs_root: Path, job_id: str) -> None:
    """Delete a job's folder: plan, chunk outputs, tissue mask and results."""
    remove_tree(job_dir(jobs_root, job_id))


@dataclasses.dataclass(frozen=True)
class SlideRecord:
    """An uploaded slide: its id (SHA-256), where it lives, its size and what the reader said about it."""

    slide_id: str
    path: Path
    filename: str
    size_bytes: int
    info: dict[str, Any]
    created: bool = False


class Upload:
    """One upload in progress: bytes go to a temporary folder next to the slides while they are hashed."""

    def __init__(self, store: SlideStore, filename: str | None, max_bytes: int) -> None:
        self.store = store
        self.ext = safe_extension(filename)
        self.original_name = Path((filename or "").replace("\\", "/")).name[:200]
        self.max_bytes = max_bytes
        self.size_bytes = 0
        self._sha = hashlib.sha256()
        store.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = store.root / f".upload-{uuid.uuid4().hex}"
        self.tmp_dir.mkdir()
        self.tmp_path = self.tmp_dir / f"slide{self.ext}"
        self._fh = self.tmp_path.open("wb")

    def write(self, data: bytes) -> None:
        """Append bytes; UploadTooLarge (and nothing left behind) once the limit is passed."""
        self.size_bytes += len(data)
        if self.size_bytes > self.max_bytes:
            self.abort()
            raise UploadTooLarge(
                f"upload exceeds the limit of {self.max_bytes} bytes; raise PIXELCAM_MAX_UPLOAD_BYTES on the server"
            )
        self._sha.update(data)
        self._fh.write(data)

    def abort(self) -> None:
        """Drop the partial upload."""
        if not self._fh.closed:
            self._fh.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def commit(self) -> SlideRecord:
        """Validate the slide by opening it, then move it into place atomically; a known slide costs nothing."""
        self._fh.close()
        slide_id = self._sha.hexdigest()
        try:
            if self.size_bytes == 0:
                raise InvalidUpload("the upload is empty; send the slide file as the request body")
            existing = self.store.find(slide_id)
            if existing is not None:
                self.store.touch(slide_id)  # uploaded again: the retention clock starts over
                return existing
            if self.ext in _MULTI_FILE:
                raise InvalidUpload(
                    f"a {_MULTI_FILE[self.ext]} slide is several files (the {self.ext} file is only its index), so "
                    "one upload cannot carry it; convert the scan to a single-file format first, e.g. "
                    "`vips tiffsave in" + self.ext + " out.tif --tile --pyramid --compression jpeg` (keeps the "
                    "resolution), then upload out.tif"
                )
            info = self.store.validate(self.tmp_path)
            meta = {"slide_id": slide_id, "filename": self.original_name, "file": self.tmp_path.name,
                    "size_bytes": self.size_bytes, "info": info}
            (self.tmp_dir / "info.json").write_text(json.dumps(meta, indent=1))
            try:
                os.rename(self.tmp_dir, self.store.root / slide_id)
            except OSError:
                # Another upload of the same bytes won the race; its copy is as good as ours.
                found = self.store.find(slide_id)
                if found is None:
                    raise
                return found
            logger.info("slide %s stored (%d bytes, %s)", slide_id, self.size_bytes, self.original_name)
            record = self.store.get(slide_id)
            return dataclasses.replace(record, created=True)
        finally:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)


class SlideStore:
    """Slides on the shared storage, addressed by the SHA-256 of their bytes."""

    def __init__(self, root: Path, inspect_timeout_s: float = 60.0, inspect_memory_bytes: int = 4 << 30) -> None:
        self.root = Path(root)
        self.inspect_timeout_s = inspect_timeout_s
        self.inspect_memory_bytes = inspect_memory_bytes

    def begin_upload(self, filename: str | None, max_bytes: int) -> Upload:
        """Start receiving a slide."""
        return Upload(self, filename, max_bytes)

    def validate(self, path: Path) -> dict[str, Any]:
        """Open the slide in a child process with a deadline and a memory limit; InvalidUpload with the reason.

        Untrusted bytes never reach a reader inside the serving process: a file that makes a reader loop, recurse
        or allocate without end costs one child, killed at the deadline, and the next upload is not affected.
        """
        return inspect_isolated(path, self.inspect_timeout_s, self.inspect_memory_bytes)

    def touch(self, slide_id: str) -> None:
        """Mark the slide as uploaded now (its info file's time is the retention clock)."""
        with contextlib.suppress(OSError):
            os.utime(self.root / slide_id / "info.json")

    def ids_older_than(self, cutoff_s: float) -> list[str]:
        """Ids of the stored slides last uploaded before `cutoff_s` (seconds since the epoch)."""
        out = []
        for folder in self.root.iterdir() if self.root.is_dir() else ():
            info = folder / "info.json"
            with contextlib.suppress(OSError):
                if is_sha256(folder.name) and info.stat().st_mtime < cutoff_s:
                    out.append(folder.name)
        return out

    def delete(self, slide_id: str) -> None:
        """Remove the stored slide's folder (the file and its info); SlideNotFound when there is none."""
        record = self.get(slide_id)
        remove_tree(record.path.parent)

    def find(self, slide_id: str) -> SlideRecord | None:
        """The slide if it is stored, else None."""
        try:
            return self.get(slide_id)
        except SlideNotFound:
            return None

    def get(self, slide_id: str) -> SlideRecord:
        """The stored slide; SlideNotFound when there is none."""
        if not is_sha256(slide_id):
            raise SlideNotFound(f"{slide_id!r} is not a slide id (the SHA-256 of the file, 64 hex digits)")
        folder = self.root / slide_id
        try:
            meta = json.loads((folder / "info.json").read_text())
        except (OSError, ValueError) as err:
            raise SlideNotFound(f"no slide {slide_id}; upload it with POST /v1/slides") from err
        return SlideRecord(slide_id=slide_id, path=folder / str(meta["file"]), filename=str(meta["filename"]),
                           size_bytes=int(meta["size_bytes"]), info=dict(meta["info"]))


def validate_here(path: Path) -> dict[str, Any]:
    """Open the slide with the core reader in this process and return its info (trusted files, or the child)."""
    missing_mpp: str | None = None
    try:
        try:
            slide = open_slide(path)
        except MissingMppError as err:
            # Readable but without a physical scale: keep it, jobs must then give `mpp` explicitly.
            logger.info("slide without mpp accepted (jobs need an mpp override): %s", err)
            missing_mpp = str(err)
            slide = open_slide(path, mpp_override=1.0)
    except SlideError as err:
        raise InvalidUpload(f"not a slide this service can read: {err}") from err
    try:
        info = _info_dict(slide.info)
    finally:
        slide.close()
    _check_overview(info)
    if missing_mpp is not None:
        info.update(mpp_x=None, mpp_y=None, mpp_source=None, mpp_missing=missing_mpp)
    return info


def _inspect_child(path: str, conn: Any, memory_bytes: int, cpu_s: int) -> None:
    """Child side of inspect_isolated: limits first, then the reader; the answer goes back through the pipe."""
    try:
        if memory_bytes > 0:
            _lower_limit(resource.RLIMIT_AS, memory_bytes)
        _lower_limit(resource.RLIMIT_CPU, cpu_s)  # SIGXCPU (which kills) past the deadline's CPU seconds
        answer: tuple[str, Any] = ("ok", validate_here(Path(path)))
    except InvalidUpload as err:
        answer = ("refused", str(err))
    except MemoryError:
        answer = ("refused", "not a slide this service can read: reading it needs more memory than a slide's "
                             "header ever should; the file is damaged or hostile")
    except BaseException as err:  # noqa: BLE001 - any reader failure on untrusted bytes is a refusal, not a crash
        answer = ("refused", f"not a slide this service can read: the reader failed on it ({type(err).__name__})")
    try:
        conn.send(answer)
    finally:
        conn.close()


def _lower_limit(which: int, value: int) -> None:
    """Lower a resource's soft limit to value (never above the hard limit this process already has)."""
    _soft, hard = resource.getrlimit(which)
    resource.setrlimit(which, (value if hard == resource.RLIM_INFINITY else min(value, hard), hard))


@functools.cache
def _context() -> Any:
    """forkserver: each inspection forks from a small, single-threaded server with the readers already imported."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["service.jobs.storage"])
    return ctx


def inspect_isolated(path: Path, timeout_s: float, memory_bytes: int) -> dict[str, Any]:
    """validate_here in a child process, killed after timeout_s; InvalidUpload for every way it can fail."""
    ctx = _context()
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_inspect_child, args=(str(path), sender, memory_bytes, int(timeout_s) + 1),
                        name="pixelcam-inspect", daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            raise InvalidUpload(
                f"not a slide this service can read: inspecting the upload took longer than {timeout_s:g} s (a "
                "readable slide's header takes well under a second); the file is damaged or hostile. An operator "
                "can raise PIXELCAM_INSPECT_TIMEOUT_S"
            )
        try:
            status, value = receiver.recv()
        except (EOFError, OSError) as err:
            raise InvalidUpload("not a slide this service can read: the reader crashed on it (the file is "
                                "damaged or hostile)") from err
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
        child.join(5)
    if status != "ok":
        raise InvalidUpload(str(value))
    return dict(value)


def _check_overview(info: dict[str, Any]) -> None:
    """Refuse slides whose smallest level is too big to look at whole (no pyramid, or a decompression bomb)."""
    sizes = [tuple(size) for size in info.get("level_sizes_wh") or [info.get("l0_size_wh") or (0, 0)]]
    w, h = min(sizes, key=lambda wh: int(wh[0]) * int(wh[1]))
    if int(w) * int(h) > constants.MAX_OVERVIEW_PX:
        raise InvalidUpload(
            f"not a slide this service can read: its smallest level is {w} x {h} px ({int(w) * int(h) / 1e9:.1f} "
            f"Gpx), above the {constants.MAX_OVERVIEW_PX / 1e9:.1f} Gpx that tissue detection may read; save it as a "
            "pyramid (`vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg`)"
        )


def _info_dict(info: Any) -> dict[str, Any]:
    """A SlideInfo or ModelMetadata as plain JSON-able data."""
    if hasattr(info, "to_dict"):
        raw = info.to_dict()
    else:
        is_instance = dataclasses.is_dataclass(info) and not isinstance(info, type)
        raw = dataclasses.asdict(info) if is_instance else dict(vars(info))
    plain: dict[str, Any] = json.loads(json.dumps(raw, default=_jsonable))
    return plain


def _jsonable(value: Any) -> Any:
    """Fallback for json.dumps: tuples, numpy scalars, paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One `.onnx` file of the models directory: valid (with its metadata) or refused (with the reason)."""

    name: str
    path: Path
    sha256: str
    size_bytes: int
    valid: bool
    reason: str
    metadata: dict[str, Any]
    # the evaluation a training job of this service wrote beside the model (`<name>.evaluation.json`), if any
    evaluation: dict[str, Any] | None = None


EVALUATION_SUFFIX = ".evaluation.json"


def _read_evaluation(model_path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(model_path.with_name(model_path.stem + EVALUATION_SUFFIX).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


class ModelRegistry:
    """The models directory, read again on every call so that a dropped-in model is picked up without restart."""

    def __init__(self, root: Path, default_name: str = "") -> None:
        self.root = Path(root)
        self.default_name = default_name
        self._cache: dict[tuple[str, int, int], ModelEntry] = {}

    def seed(self, sources: list[Path]) -> list[str]:
        """Copy models (the packaged demo model) into the directory when absent; returns the names copied."""
        self.root.mkdir(parents=True, exist_ok=True)
        copied = []
        for src in sources:
            dst = self.root / src.name
            if not dst.exists():
                tmp = self.root / f".{src.name}.{uuid.uuid4().hex}.tmp"
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
                copied.append(dst.stem)
        return copied

    def entries(self) -> list[ModelEntry]:
        """Every `.onnx` file, validated (cached by path, size and modification time)."""
        if not self.root.is_dir():
            return []
        return [self._entry(p) for p in sorted(self.root.glob("*.onnx")) if _MODEL_RE.match(p.stem)]

    def _entry(self, path: Path) -> ModelEntry:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        sha = file_sha256(path)
        try:
            meta = _info_dict(read_model_metadata(path))
            entry = ModelEntry(path.stem, path, sha, stat.st_size, True, "", meta, _read_evaluation(path))
        except InvalidModelError as err:
            logger.warning("model %s refused: %s", path.name, err)
            entry = ModelEntry(path.stem, path, sha, stat.st_size, False, str(err), {})
        self._cache[key] = entry
        return entry

    def default(self) -> str:
        """The default model: the `DEFAULT` file (set by the API), else settings, else the demo, else first valid."""
        marker = self.root / constants.DEFAULT_MODEL_FILE
        if marker.is_file():
            name = marker.read_text().strip()
            if name:
                return name
        if self.default_name:
            return Path(self.default_name).stem
        if (self.root / f"{constants.DEMO_MODEL_NAME}.onnx").is_file():
            return constants.DEMO_MODEL_NAME
        valid = [e.name for e in self.entries() if e.valid]
        if not valid:
            raise ModelUnavailable(
                f"no valid model in {self.root}; copy an .onnx exported by training/run.py there, "
                "or set PIXELCAM_MODELS_DIR"
            )
        return valid[0]

    def get(self, name: str | None = None) -> ModelEntry:
        """A servable model by name (the default when None); ModelNotFound or ModelUnavailable otherwise."""
        name = name or self.default()
        if not _MODEL_RE.match(name):
            raise ModelNotFound(f"{name!r} is not a model name; list models with GET /v1/models")
        path = self.root / f"{Path(name).stem}.onnx"
        if not path.is_file():
            raise ModelNotFound(f"no model {name!r} in the models directory; list models with GET /v1/models")
        entry = self._entry(path)
        if not entry.valid:
            raise ModelUnavailable(f"model {name!r} was refused: {entry.reason}")
        return entry

    def set_default(self, name: str) -> ModelEntry:
        """Make a valid model the default for new jobs (takes effect at once, in every process)."""
        entry = self.get(name)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{constants.DEFAULT_MODEL_FILE}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(entry.name + "\n")
        os.replace(tmp, self.root / constants.DEFAULT_MODEL_FILE)
        logger.info("default model is now %s (%s)", entry.name, entry.sha256[:12])
        return entry

    def add(self, name: str, src: Path, evaluation: dict[str, Any] | None = None) -> ModelEntry:
        """Validate a model file and move it into the directory under `name`; refused files are deleted.

        `evaluation` (a training job's report) is written beside it as `<name>.evaluation.json` first, so the
        model never appears without it; a model added without one drops a stale file of that name.
        """
        if not _MODEL_RE.match(name):
            raise InvalidUpload(f"{name!r} is not a usable model name: letters, digits, '.', '_' and '-' only")
        try:
            read_model_metadata(src)
        except InvalidModelError as err:
            src.unlink(missing_ok=True)
            # the reader names the file it was given: a temporary path of the server, not for the client
            reason = str(err).replace(str(src), "the uploaded model")
            raise InvalidUpload(f"model refused: {reason}") from err
        dst = self.root / f"{Path(name).stem}.onnx"
        if dst.exists():
            src.unlink(missing_ok=True)
            raise InvalidUpload(f"a model named {dst.stem!r} exists already; upload under another name")
        sidecar = dst.with_name(dst.stem + EVALUATION_SUFFIX)
        if evaluation is None:
            sidecar.unlink(missing_ok=True)
        else:
            tmp = self.root / f".{sidecar.name}.{uuid.uuid4().hex}.tmp"
            tmp.write_text(json.dumps(evaluation, indent=1))
            os.replace(tmp, sidecar)
        try:
            os.replace(src, dst)
        except OSError:
            if evaluation is not None:
                sidecar.unlink(missing_ok=True)
            raise
        return self.get(dst.stem)
