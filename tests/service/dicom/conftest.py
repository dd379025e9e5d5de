"""A private Orthanc with its DICOMweb plugin (Debian's `orthanc`, `orthanc-dicomweb`, `orthanc-wsi`): own free
port, own storage folder, a generated config with HTTP basic auth, stopped after the session; and the real
CMU-1-Small-Region.svs dicomized into it with OrthancWSIDicomizer. Skipped without Orthanc, failed under CI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from service.jobs.redis_server import free_port

SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"])
PLUGIN_DIRS = ["/usr/share/orthanc/plugins", "/usr/lib/orthanc"]
USER, PASSWORD = "pixelcam", "orthanc-test-password"
CMU_MPP = 0.499  # CMU-1-Small-Region.svs, from its Aperio header (MANIFEST.md)


def need(what: str, found: object) -> None:
    """Fail under CI (.ci/run installs Orthanc and dicom3tools), skip elsewhere, when a tool is missing."""
    if found:
        return
    message = f"needs {what} (apt-get install -y orthanc orthanc-dicomweb orthanc-wsi dicom3tools)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def dicomweb_plugin() -> Path | None:
    for folder in PLUGIN_DIRS:
        for path in sorted(Path(folder).glob("libOrthancDicomWeb.so*")):
            return path
    return None


@dataclass(frozen=True)
class Orthanc:
    """A running private Orthanc: its REST root, its DICOMweb root and the basic-auth credentials."""

    url: str
    dicomweb: str
    auth: tuple[str, str]

    def get(self, path: str, **kwargs: object) -> requests.Response:
        return requests.get(f"{self.url}{path}", auth=self.auth, timeout=30, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    binary = shutil.which("Orthanc", path=SEARCH_PATH)
    plugin = dicomweb_plugin()
    need("Debian's Orthanc", binary)
    need("Orthanc's DICOMweb plugin", plugin)
    root = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    config = {
        "Name": "pixelcam-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
        "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(plugin)], "HttpCompressionEnabled": False,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("w")
    proc = subprocess.Popen([str(binary), str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    server = Orthanc(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/dicom-web", (USER, PASSWORD))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if server.get("/system").ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Orthanc did not start:\n{(root / 'orthanc.log').read_text()[-3000:]}")
            time.sleep(0.1)
        plugins = server.get("/plugins").json()
        assert "dicom-web" in plugins, plugins
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@dataclass(frozen=True)
class DicomizedSlide:
    """A real slide dicomized into the private Orthanc: its UIDs."""

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str


@pytest.fixture(scope="session")
def cmu_in_orthanc(orthanc: Orthanc, cmu_small_path: Path, tmp_path_factory: pytest.TempPathFactory) -> DicomizedSlide:
    """CMU-1-Small-Region.svs through OrthancWSIDicomizer into Orthanc (its JPEG tiles kept, not re-encoded).

    The dataset JSON gives what a scanner would (ImageType, frame of reference, specimen): OrthancWSIDicomizer 1.1
    writes no ImageType of its own, which OpenSlide needs. Its pixel spacing is the imaged size over the matrix
    with width and height crossed (the image is rotated on the slide: ImageOrientationSlide 0\\-1\\0\\-1\\0\\0),
    so the imaged width is given as rows x mpp; --max-size 0 keeps the level in one instance (no concatenation).
    """
    tool = shutil.which("OrthancWSIDicomizer", path=SEARCH_PATH)
    need("OrthancWSIDicomizer (orthanc-wsi)", tool)
    root = tmp_path_factory.mktemp("dicomized")
    frame = "1.2.826.0.1.3680043.8.498.10482117412203946621"
    dataset = {
        "PatientID": "PIXELCAM-TEST-1", "PatientName": "TEST^CMU1", "PatientBirthDate": "", "PatientSex": "O",
        "StudyID": "CMU1", "AccessionNumber": "A1", "SeriesNumber": "1", "ReferringPhysicianName": "",
        "Manufacturer": "Aperio (CMU-1 test slide)", "ManufacturerModelName": "OrthancWSIDicomizer",
        "DeviceSerialNumber": "0", "SoftwareVersions": "1.1", "ImageType": "ORIGINAL\\PRIMARY\\VOLUME\\NONE",
        "FocusMethod": "AUTO", "ExtendedDepthOfField": "NO", "AcquisitionContextSequence": [],
        "FrameOfReferenceUID": frame, "ContainerIdentifier": "CMU-1-Small-Region",
        "IssuerOfTheContainerIdentifierSequence": [], "ContainerTypeCodeSequence": [],
        "SpecimenDescriptionSequence": [{"SpecimenIdentifier": "CMU-1", "SpecimenUID": f"{frame}.1",
                                         "IssuerOfTheSpecimenIdentifierSequence": [],
                                         "SpecimenPreparationSequence": []}],
        "SpecimenLabelInImage": "NO", "BurnedInAnnotation": "NO",
    }
    (root / "dataset.json").write_text(json.dumps(dataset))
    width, height = 2220, 2967
    cmd = [str(tool), str(cmu_small_path), "--dataset", str(root / "dataset.json"), "--max-size", "0",
           "--imaged-width", f"{height * CMU_MPP / 1000:.6f}", "--imaged-height", f"{width * CMU_MPP / 1000:.6f}",
           "--orthanc", f"{orthanc.url}/", "--username", USER, "--password", PASSWORD]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    series = orthanc.get("/dicom-web/series").json()
    assert len(series) == 1, series
    return DicomizedSlide(study_uid=series[0]["0020000D"]["Value"][0], series_uid=series[0]["0020000E"]["Value"][0],
                          frame_of_reference_uid=frame)
