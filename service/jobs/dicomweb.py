"""DICOMweb archives (dicomweb-client): a slide named by its series is imported once into the slide store over
WADO-RS, and DICOM results go back with STOW-RS.

Why an import and not tile reads over the network: the archive is usually on the hospital's LAN and a WSI series
is 100 MB - 2 GB, so one streamed WADO-RS retrieval of the series (every instance, in its stored transfer syntax,
byte for byte) costs seconds to a minute once, after which the slide is a content-addressed folder of the slide
store like any upload: OpenSlide reads the DICOM series folder, and Deep Zoom, the viewer, reports, reruns and
training see one code path. Frame-by-frame reads would send every tile request of the viewer and every rerun back
to the archive. The reference (archive URL, study, series and frame of reference UIDs) is kept in the slide's info,
so the results can name their source.

Only archives whose base URL is in `PIXELCAM_DICOMWEB_ALLOWED_URLS` are ever contacted (the service would
otherwise fetch any URL a client names); credentials come from `PIXELCAM_DICOMWEB_AUTH`, never from a request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from service.errors import (
    ArchiveNotFound,
    ArchiveUnavailable,
    Forbidden,
    InvalidRequest,
    InvalidUpload,
    UploadTooLarge,
)
from service.jobs.storage import SlideRecord, SlideStore
from service.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["DicomwebRef", "allowed_base", "open_archive", "import_series", "store_datasets", "INDEX_DIR"]

INDEX_DIR = "dicomweb"  # <storage>/dicomweb/<sha256 of the reference>.json: which slide a reference became
_WSI = pydicom.uid.VLWholeSlideMicroscopyImageStorage
_ANY_SYNTAX = (("application/dicom", "*"),)  # every instance as stored: no transcoding by the archive


@dataclasses.dataclass(frozen=True)
class DicomwebRef:
    """A series in a DICOMweb archive: the archive's base URL (the DICOMweb root), study and series UIDs."""

    url: str
    study_uid: str
    series_uid: str

    @property
    def key(self) -> str:
        """A stable name of the reference (the index file's name)."""
        return hashlib.sha256(f"{self.url.rstrip('/')}\n{self.study_uid}\n{self.series_uid}".encode()).hexdigest()


def _normal(url: str) -> tuple[str, str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/")


def allowed_base(url: str, settings: Settings) -> str:
    """The URL (no trailing slash) if it is, or lies under, an allowed archive base URL; Forbidden otherwise."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise InvalidRequest(f"{url!r} is not an http(s) URL of a DICOMweb archive (e.g. http://pacs:8042/dicom-web)")
    if parts.username or parts.password:
        raise InvalidRequest("the DICOMweb URL carries credentials; leave them out of requests and set "
                             "PIXELCAM_DICOMWEB_AUTH on the server instead")
    if parts.query or parts.fragment:
        raise InvalidRequest(f"the DICOMweb URL {url!r} has a query or fragment; give the archive's base URL")
    scheme, netloc, path = _normal(url)
    for base in settings.dicomweb_allowed_list:
        b_scheme, b_netloc, b_path = _normal(base)
        if (scheme, netloc) == (b_scheme, b_netloc) and (path == b_path or path.startswith(b_path + "/")):
            return url.rstrip("/")
    allowed = ", ".join(settings.dicomweb_allowed_list) or "none (the list is empty)"
    raise Forbidden(f"the DICOMweb archive {url!r} is not allowed on this server (allowed: {allowed}); an "
                    "operator adds its base URL to PIXELCAM_DICOMWEB_ALLOWED_URLS")


def open_archive(url: str, settings: Settings) -> DICOMwebClient:
    """A client of an allowed archive, with the server's credentials and timeout."""
    base = allowed_base(url, settings)
    session = requests.Session()
    kind, _, secret = settings.dicomweb_auth.partition(":")
    if kind == "bearer":
        session.headers["Authorization"] = f"Bearer {secret}"
    elif kind == "basic":
        user, _, password = secret.partition(":")
        session.auth = (user, password)
    client = DICOMwebClient(base, session=session, timeout=settings.dicomweb_timeout_s)
    # its default retries every failure 5 times over 30 s; on a LAN, 3 tries within 1.5 s tell a dead archive
    client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=250)
    return client


@contextlib.contextmanager
def _archive_errors(url: str, what: str) -> Iterator[None]:
    """Network and HTTP failures of the archive as the service's errors, with the reason and what to do."""
    try:
        yield
    except requests.HTTPError as err:
        status = err.response.status_code if err.response is not None else 0
        if status == 404:
            raise ArchiveNotFound(f"the DICOMweb archive {url} has no {what} (HTTP 404); check the UIDs") from err
        if status in (401, 403):
            raise ArchiveUnavailable(f"the DICOMweb archive {url} refused the server's credentials for {what} "
                                     f"(HTTP {status}); an operator sets PIXELCAM_DICOMWEB_AUTH") from err
        raise ArchiveUnavailable(f"the DICOMweb archive {url} failed on {what} (HTTP {status}); retry later or "
                                 "ask its operator") from err
    except requests.Timeout as err:
        raise ArchiveUnavailable(f"the DICOMweb archive {url} did not answer within the timeout for {what}; "
                                 "retry later (PIXELCAM_DICOMWEB_TIMEOUT_S sets the limit)") from err
    except requests.RequestException as err:
        raise ArchiveUnavailable(f"the DICOMweb archive {url} cannot be reached ({type(err).__name__}); check the "
                                 "URL and that the archive is up") from err


def _write_instance(ds: Dataset, folder: Path) -> tuple[Path, str, int]:
    """One retrieved instance as a Part 10 file named by its SOP Instance UID; (path, SHA-256, size)."""
    path = folder / f"{hashlib.sha256(str(ds.SOPInstanceUID).encode()).hexdigest()[:32]}.dcm"
    ds.save_as(path, enforce_file_format=True)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return path, digest.hexdigest(), path.stat().st_size


def _level0(files: Sequence[tuple[Path, Dataset]]) -> tuple[Path, Dataset]:
    """The VOLUME image with the largest total pixel matrix: the file the slide store names."""
    volumes = [(p, d) for p, d in files
               if d.get("SOPClassUID") == _WSI and "VOLUME" in [str(v).upper() for v in d.get("ImageType", [])]]
    if not volumes:
        raise InvalidUpload("the DICOMweb series holds no VL Whole Slide Microscopy volume image (SOP classes: "
                            f"{', '.join(sorted({str(d.get('SOPClassUID', '?')) for _, d in files}))}); name the "
                            "series of the slide's pyramid")
    return max(volumes, key=lambda pd: int(pd[1].get("TotalPixelMatrixColumns", 0))
               * int(pd[1].get("TotalPixelMatrixRows", 0)))


def _index_path(settings: Settings, ref: DicomwebRef) -> Path:
    return settings.storage_dir / INDEX_DIR / f"{ref.key}.json"


def _remember(settings: Settings, ref: DicomwebRef, slide_id: str) -> None:
    path = _index_path(settings, ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps({"slide_id": slide_id, **dataclasses.asdict(ref)}))
    os.replace(tmp, path)


def _known(settings: Settings, ref: DicomwebRef, store: SlideStore) -> SlideRecord | None:
    try:
        slide_id = json.loads(_index_path(settings, ref).read_text())["slide_id"]
    except (OSError, ValueError, KeyError):
        return None
    return store.find(str(slide_id))


def import_series(ref: DicomwebRef, store: SlideStore, settings: Settings) -> SlideRecord:
    """The series as a stored slide: retrieved once (a reference seen before costs nothing while its slide is
    stored), validated like an upload, kept under the SHA-256 of its instances' SHA-256s."""
    with warnings.catch_warnings():
        # pydicom warns about values beyond their VR's limits (e.g. 66-character UIDs of real scanners): the
        # instances are kept as the archive sent them, and the slide reader decides whether they are usable
        warnings.simplefilter("ignore", UserWarning)
        return _import(ref, store, settings)


def _import(ref: DicomwebRef, store: SlideStore, settings: Settings) -> SlideRecord:
    known = _known(settings, ref, store)
    if known is not None:
        return known
    client = open_archive(ref.url, settings)
    url = ref.url.rstrip("/")
    what = f"series {ref.series_uid} of study {ref.study_uid}"
    with _archive_errors(url, what):
        found = client.search_for_instances(ref.study_uid, ref.series_uid, fields=["00080016"])
    if not found:
        raise ArchiveNotFound(f"the DICOMweb archive {ref.url} has no {what}; check the UIDs (QIDO-RS "
                              f"/studies/{ref.study_uid}/series/{ref.series_uid}/instances is empty)")
    store.root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".dicomweb-", dir=store.root))
    try:
        files, hashes, total = [], [], 0
        with _archive_errors(url, what):
            for ds in client.iter_series(ref.study_uid, ref.series_uid, media_types=_ANY_SYNTAX):
                path, digest, size = _write_instance(ds, tmp)
                total += size
                if total > settings.max_upload_bytes:
                    raise UploadTooLarge(f"{what} is larger than {settings.max_upload_bytes} bytes, the largest "
                                         "slide this server takes; raise PIXELCAM_MAX_UPLOAD_BYTES")
                files.append((path, pydicom.dcmread(path, stop_before_pixels=True)))
                hashes.append(digest)
        main, header = _level0(files)
        slide_id = hashlib.sha256("\n".join(["dicomweb-series", *sorted(hashes)]).encode()).hexdigest()
        existing = store.find(slide_id)
        if existing is None:
            info = store.validate(main)  # in a child process with a deadline, as uploads are
            info["dicomweb"] = {"url": ref.url.rstrip("/"), "study_uid": ref.study_uid,
                                "series_uid": ref.series_uid,
                                "frame_of_reference_uid": str(header.get("FrameOfReferenceUID", "")) or None,
                                "instances": len(files)}
            meta = {"slide_id": slide_id, "filename": f"dicomweb-{ref.series_uid}"[:200], "file": main.name,
                    "size_bytes": total, "info": info}
            (tmp / "info.json").write_text(json.dumps(meta, indent=1))
            try:
                os.rename(tmp, store.root / slide_id)
            except OSError:
                if store.find(slide_id) is None:  # not a twin import that won the race
                    raise
            logger.info("imported %s from %s as slide %s (%d instances, %d bytes)", what, ref.url, slide_id,
                        len(files), total)
        _remember(settings, ref, slide_id)
        return store.get(slide_id)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def store_datasets(url: str, datasets: Sequence[Dataset], settings: Settings) -> dict[str, Any]:
    """STOW-RS the objects to an allowed archive, grouped by study; the archive's answer, counted."""
    client = open_archive(url, settings)
    stored, failed = [], []
    by_study: dict[str, list[Dataset]] = {}
    for ds in datasets:
        by_study.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    for study, group in by_study.items():
        with _archive_errors(url.rstrip("/"), f"storing {len(group)} object(s) in study {study}"):
            answer = client.store_instances(group, study_instance_uid=study)
        stored += [str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence", [])]
        failed += [str(item.ReferencedSOPInstanceUID) for item in answer.get("FailedSOPSequence", [])]
    if failed:
        raise ArchiveUnavailable(f"the DICOMweb archive {url} refused {len(failed)} of {len(datasets)} object(s) "
                                 f"({', '.join(failed[:5])}); its log says why")
    return {"url": url.rstrip("/"), "stored": stored}
