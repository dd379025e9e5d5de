"""QuPath interop of a real finished job: its GeoJSON against QuPath's reader rules (FIELD.md 4.1), tile objects
whose probability measurements reproduce the heatmap (measurement maps), and the heatmap TIFF's size and pixel size."""

from __future__ import annotations

import json
import math
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient

from service.api import create_app
from service.jobs.worker import Worker
from service.outputs.deepzoom import TiffHeatmap
from service.settings import Settings
from tests.conftest import shared_data_dir
from tests.service.shell import make_settings

pytestmark = pytest.mark.redis

SLIDE = "CMU-1-Small-Region.svs"
DATA_SLIDES = shared_data_dir() / "slides"
CMU_WH = (2220, 2967)
CMU_MPP = 0.499
OBJECT_TYPES = {"annotation", "detection", "tile", "cell", "tmaCore", "root"}
GEOMETRY_TYPES = {"Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon",
                  "GeometryCollection"}


@pytest.fixture(scope="module")
def done_job(tmp_path_factory: pytest.TempPathFactory, redis_url: str,
             shell_model_path: Path) -> Iterator[tuple[TestClient, str, dict[str, Any], Settings]]:
    """One real job for the whole module: uploaded through the API, run to the end by a real worker."""
    root = tmp_path_factory.mktemp("qupath")
    models = root / "models"
    models.mkdir()
    shutil.copyfile(shell_model_path, models / "random.onnx")
    settings = make_settings(root, redis_url, models)
    with TestClient(create_app(settings)) as client:
        resp = client.post("/v1/analyze", content=(DATA_SLIDES / SLIDE).read_bytes(), params={"filename": SLIDE},
                           headers={"Content-Type": "application/octet-stream"})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["job_id"]
        Worker(settings, name="qupath-test").run(burst=True)
        result = client.get(f"/v1/jobs/{job_id}/result")
        assert result.status_code == 200, result.text
        yield client, job_id, result.json(), settings


def _rings(geometry: dict[str, Any]) -> list[list[list[float]]]:
    if geometry["type"] == "Polygon":
        return list(geometry["coordinates"])
    if geometry["type"] == "MultiPolygon":
        return [ring for polygon in geometry["coordinates"] for ring in polygon]
    return []


def _check_feature(feature: dict[str, Any]) -> None:
    """One feature as QuPath >= 0.4 reads it."""
    assert feature["type"] == "Feature"
    assert str(uuid.UUID(feature["id"])) == feature["id"].lower(), "id must be a UUID string"
    assert "objectType" not in feature and "name" not in feature, "QuPath ignores these at Feature top level"
    assert feature["geometry"]["type"] in GEOMETRY_TYPES
    props = feature["properties"]
    assert props["objectType"] in OBJECT_TYPES
    cls = props["classification"]
    assert isinstance(cls["name"], str) and cls["name"]
    assert len(cls["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
    measurements = props.get("measurements", {})
    assert isinstance(measurements, dict), "measurements must be an object (name -> number) since QuPath 0.4"
    assert all(isinstance(v, int | float) and math.isfinite(v) for v in measurements.values())
    for ring in _rings(feature["geometry"]):
        assert len(ring) >= 4 and ring[0] == ring[-1], "polygon rings are closed"
        xy = np.asarray(ring, dtype=np.float64)
        assert np.isfinite(xy).all()
        # level-0 pixels, origin top-left: annotations inside the slide; a tile at the right or bottom edge may
        # reach past it (QuPath keeps such objects) but starts inside
        assert (xy >= 0).all()
        if props["objectType"] == "annotation":
            assert (xy[:, 0] <= CMU_WH[0]).all() and (xy[:, 1] <= CMU_WH[1]).all()
        else:
            assert xy[:, 0].min() < CMU_WH[0] and xy[:, 1].min() < CMU_WH[1]


def test_geojson_follows_qupath_reader_rules(done_job: tuple[TestClient, str, dict[str, Any], Settings]) -> None:
    client, job_id, _, _ = done_job
    collection = json.loads(client.get(f"/v1/jobs/{job_id}/geojson").content)
    assert collection["type"] == "FeatureCollection" and isinstance(collection["features"], list)
    features = collection["features"]
    assert features, "a finished job on tissue has tile objects at least"
    for feature in features:
        _check_feature(feature)
    ids = [f["id"] for f in features]
    assert len(set(ids)) == len(ids), "ids are unique"
    again = json.loads(client.get(f"/v1/jobs/{job_id}/geojson").content)
    assert [f["id"] for f in again["features"]] == ids, "ids are stable between downloads"


def test_tile_measurements_reproduce_the_heatmap(done_job: tuple[TestClient, str, dict[str, Any], Settings]) -> None:
    client, job_id, result, settings = done_job
    features = json.loads(client.get(f"/v1/jobs/{job_id}/geojson").content)["features"]
    tiles = [f for f in features if f["properties"]["objectType"] in ("tile", "detection")]
    assert len(tiles) == result["evidence"]["tiles_analysed"]
    hm_ds = float(result["heatmap"]["hm_downsample"])
    heatmap = TiffHeatmap(settings.jobs_dir / job_id / "heatmap.tif", hm_ds)
    errors = []
    for tile in tiles:
        measurements = tile["properties"]["measurements"]
        assert 0.0 <= measurements["probability"] <= 1.0
        (x0, y0), (x1, y1) = tile["geometry"]["coordinates"][0][0], tile["geometry"]["coordinates"][0][2]
        hm_x0, hm_y0 = round(x0 / hm_ds), round(y0 / hm_ds)
        hm_x1 = min(round(x1 / hm_ds), heatmap.level_size_wh(0)[0])
        hm_y1 = min(round(y1 / hm_ds), heatmap.level_size_wh(0)[1])
        cells = heatmap.read_box(0, (hm_x0, hm_y0), (hm_x1 - hm_x0, hm_y1 - hm_y0))
        assert np.isfinite(cells).all(), "every cell under an analysed tile is analysed"
        errors.append(abs(float(cells.mean()) - measurements["fg_mean"]))
    heatmap.close()
    # the tile measurement QuPath maps is the heatmap's mean under the tile (up to 8-bit storage and blending)
    assert np.median(errors) < 0.02 and max(errors) < 0.1, errors


def test_heatmap_tiff_opens_with_the_stated_size_and_pixel_size(
        done_job: tuple[TestClient, str, dict[str, Any], Settings]) -> None:
    client, job_id, result, _ = done_job
    meta = result["heatmap"]
    data = client.get(f"/v1/jobs/{job_id}/heatmap.tif").content
    hm_ds = float(meta["hm_downsample"])
    expected_wh = (math.ceil(CMU_WH[0] / hm_ds), math.ceil(CMU_WH[1] / hm_ds))
    assert tuple(meta["size_wh"]) == expected_wh and tuple(meta["l0_size_wh"]) == CMU_WH
    assert meta["hm_mpp"] == pytest.approx(CMU_MPP * hm_ds, rel=1e-3)
    import io

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        assert (page.imagewidth, page.imagelength) == expected_wh
        assert page.is_tiled and page.dtype == np.uint8
        x_res = page.tags["XResolution"].value
        unit = page.tags["ResolutionUnit"].value
        assert unit == tifffile.RESUNIT.CENTIMETER
        um_per_px = 1e4 / (x_res[0] / x_res[1])
        assert um_per_px == pytest.approx(meta["hm_mpp"], rel=1e-3), "pixel size tags give the heatmap's mpp"
        levels = tif.series[0].levels
        assert len(levels) >= 1 and levels[0].shape[:2] == expected_wh[::-1]
