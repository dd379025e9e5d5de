"""Hostile and broken uploads: each gets a specific 4xx JSON error, leaves nothing behind, and the server serves on."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from PIL import Image

from service import constants
from service.api import create_app
from service.errors import InvalidUpload
from service.jobs.storage import SlideStore
from service.jobs.worker import Worker
from service.settings import Settings
from tests.service.shell import REPO_ROOT, live_app, make_settings

pytestmark = pytest.mark.redis

SLIDE = "CMU-1-Small-Region.svs"


def bomb_tiff(path: Path, size: int = 200_000, tile: int = 1024) -> Path:
    """A valid tiled RGB TIFF declaring size x size px (120 GB decoded) in ~300 kB: every tile is one zlib blob."""
    blob = zlib.compress(bytes(tile * tile * 3), 9)
    n = ((size + tile - 1) // tile) ** 2
    off_offsets = 8 + len(blob)
    off_counts = off_offsets + 4 * n
    off_bps = off_counts + 4 * n
    off_res = off_bps + 6
    off_ifd = off_res + 8
    short, long_, rational = 3, 4, 5
    tags = [(256, long_, 1, size), (257, long_, 1, size), (258, short, 3, off_bps), (259, short, 1, 8),
            (262, short, 1, 2), (277, short, 1, 3), (282, rational, 1, off_res), (283, rational, 1, off_res),
            (284, short, 1, 1), (296, short, 1, 3), (322, short, 1, tile), (323, short, 1, tile),
            (324, long_, n, off_offsets), (325, long_, n, off_counts)]
    ifd = struct.pack("<H", len(tags))
    for tag, kind, count, value in tags:
        packed = struct.pack("<HH", value, 0) if kind == short and count == 1 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    ifd += struct.pack("<I", 0)  # no next directory
    with path.open("wb") as fh:
        fh.write(b"II*\x00" + struct.pack("<I", off_ifd) + blob)
        fh.write(struct.pack(f"<{n}I", *([8] * n)) + struct.pack(f"<{n}I", *([len(blob)] * n)))
        fh.write(struct.pack("<HHH", 8, 8, 8) + struct.pack("<II", 40000, 1) + ifd)  # 0.25 um/px
    return path


def looping_tiff(sizes: tuple[int, ...], loop_to: int) -> bytes:
    """A small tiled TIFF whose last IFD's next-IFD offset points back at IFD `loop_to`: a cycle in the chain.

    IFD 0 carries an ImageDescription: without one tifffile stops at the loop, with one its series parsing spins.
    """
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        for i, size in enumerate(sizes):
            tw.write(np.zeros((size, size, 3), np.uint8), tile=(16, 16), photometric="rgb", compression="zlib",
                     resolution=(40000, 40000), resolutionunit=3, metadata=None,
                     description="scan" if i == 0 else None)
    data = bytearray(buf.getvalue())
    offsets, offset = [], struct.unpack_from("<I", data, 4)[0]
    while offset:
        offsets.append(offset)
        offset = struct.unpack_from("<I", data, offset + 2 + 12 * struct.unpack_from("<H", data, offset)[0])[0]
    last = offsets[-1]
    struct.pack_into("<I", data, last + 2 + 12 * struct.unpack_from("<H", data, last)[0], offsets[loop_to])
    return bytes(data)


def subifd_loop_tiff() -> bytes:
    """A tiled TIFF whose SubIFDs tag points at its own IFD (a reader that follows it recurses without end)."""
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(np.zeros((64, 64, 3), np.uint8), tile=(16, 16), subifds=1, photometric="rgb",
                 resolution=(40000, 40000), resolutionunit=3)
        tw.write(np.zeros((32, 32, 3), np.uint8), tile=(16, 16), subfiletype=1, photometric="rgb")
    data = bytearray(buf.getvalue())
    ifd0 = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd0)[0]):
        entry = ifd0 + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 330:  # SubIFDs
            struct.pack_into("<I", data, entry + 8, ifd0)
    return bytes(data)


def photo(fmt: str) -> bytes:
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# (case, file name sent, how to make the bytes, a phrase the error must contain)
CASES: list[tuple[str, str, Callable[[Path, Path], bytes], str]] = [
    ("zero-bytes", "empty.svs", lambda s, t: b"", "empty"),
    ("random-bytes", "random.svs", lambda s, t: np.random.default_rng(0).bytes(200_000), "not a slide"),
    ("truncated-svs", SLIDE, lambda s, t: (s / SLIDE).read_bytes()[:700_000], "not a slide"),
    ("decompression-bomb", "huge.tif", lambda s, t: bomb_tiff(t / "bomb.tif").read_bytes(), "--pyramid"),
    ("png-photo", "photo.png", lambda s, t: photo("PNG"), "not a slide"),
    ("jpeg-photo", "photo.jpg", lambda s, t: photo("JPEG"), "not a slide"),
    ("fluorescence-qptiff", "small_vectra.qptiff", lambda s, t: (s / "small_vectra.qptiff").read_bytes(),
     "fluorescence"),
    ("non-conformant-dicom", "small_dicom.dcm",
     lambda s, t: (s / "dicom_pathml_small" / "small_dicom.dcm").read_bytes(), "non-conformant"),
    ("one-file-of-an-mrxs", "CMU-1.mrxs", lambda s, t: photo("JPEG"), "one upload cannot carry it"),
    ("subifd-points-at-itself", "sub.tif", lambda s, t: subifd_loop_tiff(), "not a slide"),
    ("ifd-loop-between-equal-levels", "loop.tif", lambda s, t: looping_tiff((64, 64), 0), "not a slide"),
    ("one-file-of-a-dicom-series", "boxes_1.dcm", lambda s, t: (s / "dicom_boxes" / "boxes_1.dcm").read_bytes(),
     "every instance of the series"),
]


@pytest.fixture()
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def stored_files(settings: Settings) -> list[str]:
    """Every file under the slides folder (partial uploads live in dot folders there)."""
    if not settings.slides_dir.exists():
        return []
    return sorted(str(p.relative_to(settings.slides_dir)) for p in settings.slides_dir.rglob("*"))


@pytest.mark.parametrize(("case", "name", "make", "phrase"), CASES, ids=[c[0] for c in CASES])
def test_bad_upload_is_a_specific_4xx_and_leaves_nothing(client: TestClient, settings: Settings, slides_dir: Path,
                                                         tmp_path: Path, case: str, name: str,
                                                         make: Callable[[Path, Path], bytes], phrase: str) -> None:
    data = make(slides_dir, tmp_path)
    for route in ("/v1/slides", "/v1/analyze"):
        resp = client.post(route, content=data, params={"filename": name})
        assert resp.status_code == 415, (case, route, resp.text)
        assert resp.headers["content-type"] == "application/json"
        assert resp.json()["error"] == "InvalidUpload" and phrase in resp.json()["detail"], resp.json()
    form = client.post("/v1/slides", files={"file": (name, data, "application/octet-stream")})
    assert form.status_code == 415 and phrase in form.json()["detail"]
    assert stored_files(settings) == []
    assert client.get("/v1/jobs").json() == {"jobs": []}  # /v1/analyze queued nothing
    good = client.post("/v1/slides", content=(slides_dir / "small_16x16.svs").read_bytes(),
                       params={"filename": "small.svs"})
    assert good.status_code == 201  # the server keeps serving


def test_wrong_content_types_are_refused_clearly(client: TestClient, settings: Settings, slides_dir: Path) -> None:
    data = (slides_dir / SLIDE).read_bytes()
    no_boundary = client.post("/v1/slides", content=data, headers={"Content-Type": "multipart/form-data"})
    assert no_boundary.status_code == 415 and "boundary" in no_boundary.json()["detail"]
    raw_as_form = client.post("/v1/slides", content=data,
                              headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert raw_as_form.status_code == 415 and raw_as_form.json()["error"] == "InvalidUpload"
    as_json = client.post("/v1/slides", json={"slide": "base64?"})
    assert as_json.status_code == 415 and "not a slide" in as_json.json()["detail"]
    job_as_text = client.post("/v1/jobs", content=b"slide_id=abc", headers={"Content-Type": "text/plain"})
    assert job_as_text.status_code == 422 and job_as_text.json()["error"] == "ValidationError"
    not_utf8 = client.post("/v1/jobs", content=b"\xff\xfe{", headers={"Content-Type": "application/json"})
    assert not_utf8.status_code == 400 and "UTF-8 JSON object" in not_utf8.json()["detail"]
    assert stored_files(settings) == []


def test_the_bomb_is_refused_without_memory_for_its_declared_size(tmp_path: Path) -> None:
    bomb = bomb_tiff(tmp_path / "bomb.tif")
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"  # 3 GB of address space for 120 GB
        "from pathlib import Path\n"
        "from service.errors import InvalidUpload\n"
        "from service.jobs.storage import SlideStore\n"
        "try:\n"
        f"    SlideStore(Path({str(tmp_path / 'store')!r})).validate(Path({str(bomb)!r}))\n"
        "except InvalidUpload as err:\n"
        "    print('REFUSED', err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("REFUSED") and "200000 x 200000" in done.stdout


def test_odd_slides_that_pass_upload_never_leave_a_job_stuck(client: TestClient, settings: Settings,
                                                             slides_dir: Path) -> None:
    def up(path: Path, name: str) -> str:
        resp = client.post("/v1/slides", content=path.read_bytes(), params={"filename": name})
        assert resp.status_code == 201, resp.text
        return str(resp.json()["slide_id"])

    no_mpp = up(slides_dir / "kidney-48-5.tif", "kidney.tif")
    absurd_mpp = up(slides_dir / "boxes_pyramid.tiff", "boxes.tiff")
    for slide_id in (no_mpp, absurd_mpp):
        refused = client.post("/v1/jobs", json={"slide_id": slide_id})
        assert refused.status_code == 422 and '"mpp"' in refused.json()["detail"]
    jobs = {
        "too-coarse": client.post("/v1/jobs", json={"slide_id": up(
            slides_dir / "dicom_camelyon16_lowres" / "multiframe_camelyon_challenge_image.dcm", "c.dcm")}),
        "series-head-alone": client.post("/v1/jobs", json={"slide_id": up(slides_dir / "dicom_boxes" / "boxes_0.dcm",
                                                                           "boxes_0.dcm")}),
        "no-mpp-overridden": client.post("/v1/jobs", json={"slide_id": no_mpp, "mpp": 2.0}),
    }
    assert all(r.status_code == 202 for r in jobs.values()), {k: r.text for k, r in jobs.items()}
    Worker(settings).run(burst=True)
    final = {k: client.get(f"/v1/jobs/{r.json()['job_id']}").json() for k, r in jobs.items()}
    assert all(j["state"] in constants.TERMINAL_STATES for j in final.values()), final
    assert final["too-coarse"]["state"] == "failed" and "coarser" in final["too-coarse"]["error"]
    assert final["series-head-alone"]["state"] == "done"
    assert final["no-mpp-overridden"]["state"] == "done"


@pytest.fixture()
def live_server(tmp_path: Path, redis_url: str, shell_models_dir: Path) -> Iterator[tuple[str, int, Settings]]:
    """The API under uvicorn in a thread (a real socket: uploads arrive as slowly as the client sends them)."""
    settings = make_settings(tmp_path, redis_url, shell_models_dir, upload_idle_timeout_s=1.0)
    with live_app(settings) as port:
        yield "127.0.0.1", port, settings


def _get(host: str, port: int, path: str) -> tuple[int, float]:
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status, _ = _read_reply(sock)
    return status, time.monotonic() - t0


def _read_reply(sock: socket.socket) -> tuple[int, dict]:
    """One HTTP reply off a raw socket: the head and a JSON body may come in separate segments, so read until the
    body's Content-Length is in (or the server closes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(fields.get("content-length", "-1"))
    while length < 0 or len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), json.loads(body)


def test_a_trickling_upload_blocks_no_one_and_is_dropped_when_idle(live_server: tuple[str, int, Settings]) -> None:
    host, port, settings = live_server
    slow = socket.create_connection((host, port), timeout=30)
    slow.sendall(b"POST /v1/slides?filename=slow.svs HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream"
                 b"\r\nContent-Length: 1000000\r\n\r\n")
    for _ in range(5):  # a byte every 0.2 s: the upload stays alive, and other requests are answered meanwhile
        slow.sendall(b"\x00")
        assert _get(host, port, "/healthz")[0] == 200
        assert _get(host, port, "/v1/jobs")[0] == 200
        time.sleep(0.2)
    assert any(p.name.startswith(".upload-") for p in settings.slides_dir.iterdir())  # in progress
    status, body = _read_reply(slow)  # the client stops sending: after PIXELCAM_UPLOAD_IDLE_TIMEOUT_S it is dropped
    slow.close()
    assert status == 408 and body["error"] == "UploadTimeout" and "PIXELCAM_UPLOAD_IDLE_TIMEOUT_S" in body["detail"]
    assert list(settings.slides_dir.iterdir()) == []  # the partial file is gone
    assert _get(host, port, "/healthz")[0] == 200


def test_concurrent_uploads_of_the_same_bytes_store_one_slide(live_server: tuple[str, int, Settings],
                                                              slides_dir: Path) -> None:
    host, port, settings = live_server
    data = (slides_dir / SLIDE).read_bytes()

    async def upload_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/slides", content=data, params={"filename": f"{i}.svs"})
                                          for i in range(8)))

    answers = asyncio.run(upload_all())
    assert sorted(r.status_code for r in answers) == [200] * 7 + [201]
    assert len({r.json()["slide_id"] for r in answers}) == 1
    assert stored_files(settings) == sorted([answers[0].json()["slide_id"], f"{answers[0].json()['slide_id']}/info.json",
                                             f"{answers[0].json()['slide_id']}/slide.svs"])


# IFD chains that loop: tifffile's series parsing spins on these (measured: >30 s of CPU, never returning)
LOOPS = {"two-levels-back-to-0": ((64, 32), 0), "three-levels-back-to-1": ((64, 32, 16), 1),
         "three-levels-back-to-0": ((64, 32, 16), 0)}


@pytest.mark.parametrize("case", list(LOOPS))
def test_a_looping_ifd_chain_is_refused_at_the_deadline(tmp_path: Path, case: str) -> None:
    sizes, loop_to = LOOPS[case]
    hostile = tmp_path / "loop.tif"
    hostile.write_bytes(looping_tiff(sizes, loop_to))
    t0 = time.monotonic()
    with pytest.raises(InvalidUpload, match="took longer than 2 s"):
        SlideStore(tmp_path / "store", inspect_timeout_s=2).validate(hostile)
    assert time.monotonic() - t0 < 10


def test_a_hanging_upload_wedges_no_one_and_leaves_nothing(tmp_path: Path, redis_url: str, shell_models_dir: Path,
                                                           slides_dir: Path) -> None:
    settings = make_settings(tmp_path, redis_url, shell_models_dir, inspect_timeout_s=20.0)
    hostile = looping_tiff((64, 32), 0)
    with live_app(settings) as port:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=60) as http:
            answer: dict[str, httpx.Response] = {}

            def send_hostile() -> None:
                answer["hostile"] = http.post("/v1/slides", content=hostile, params={"filename": "loop.tif"})

            attacker = threading.Thread(target=send_hostile)
            t0 = time.monotonic()
            attacker.start()
            time.sleep(1.0)  # the hostile file is being inspected now
            # a real slide, uploaded and analysed while the hostile upload is in flight
            good = http.post("/v1/slides", content=(slides_dir / SLIDE).read_bytes(), params={"filename": SLIDE})
            assert good.status_code == 201, good.text
            job = http.post("/v1/jobs", json={"slide_id": good.json()["slide_id"]})
            assert job.status_code == 202, job.text
            Worker(settings).run(burst=True)
            state = http.get(f"/v1/jobs/{job.json()['job_id']}").json()
            assert state["state"] == "done", state
            assert attacker.is_alive(), "the hostile upload should still be in flight while the good job ran"
            assert http.get("/healthz").status_code == 200
            attacker.join(60)
            assert not attacker.is_alive()
            refused = answer["hostile"]
            assert refused.status_code == 415 and "took longer than 20 s" in refused.json()["detail"], refused.text
            assert 19 < time.monotonic() - t0 < 40
            # after it: uploads work, and nothing of the hostile upload is left
            again = http.post("/v1/slides", content=(slides_dir / "small_16x16.svs").read_bytes(),
                              params={"filename": "small.svs"})
            assert again.status_code == 201
    assert not [p for p in settings.slides_dir.iterdir() if p.name.startswith(".upload-")]


def test_a_job_over_the_tile_limit_fails_with_the_limit_and_the_next_job_runs(tmp_path: Path, redis_url: str,
                                                                              shell_models_dir: Path,
                                                                              slides_dir: Path) -> None:
    settings = make_settings(tmp_path, redis_url, shell_models_dir, max_tiles_per_job=20)
    with TestClient(create_app(settings)) as client:
        slide_id = client.post("/v1/slides", content=(slides_dir / SLIDE).read_bytes(),
                               params={"filename": SLIDE}).json()["slide_id"]
        costly = client.post("/v1/jobs", json={"slide_id": slide_id, "options": {"overlap": 0.9}})
        cheap = client.post("/v1/jobs", json={"slide_id": slide_id, "options": {"min_tissue": 0.5}})
        assert costly.status_code == 202 and cheap.status_code == 202, (costly.text, cheap.text)
        Worker(settings).run(burst=True)
        failed = client.get(f"/v1/jobs/{costly.json()['job_id']}").json()
        done = client.get(f"/v1/jobs/{cheap.json()['job_id']}").json()
    assert failed["state"] == "failed" and "over this server's limit of 20" in failed["error"], failed
    assert "PIXELCAM_MAX_TILES_PER_JOB" in failed["error"] and "overlap" in failed["error"]
    assert done["state"] == "done" and 0 < done["tiles_total"] <= 20, done
    assert not (settings.jobs_dir / costly.json()["job_id"] / "plan_tiles.npz").exists()
