"""The hospital loop on a private Orthanc: CMU-1-Small-Region.svs dicomized into it, analysed by its DICOMweb
reference through the API with a real worker, the results stored back with STOW-RS, read back over QIDO-RS and
WADO-RS, and compared with the file-based run of the same .svs with the same model (`analyze_slide`).

Tolerances: the segmentation holds the job's heatmap exactly (FRACTIONAL, Maximum Fractional Value 254: stored =
heatmap value - 1, so p keeps heatmap.tif's own 1/254 quantisation; difference 0), and the job (import, queue,
worker) gives exactly what `analyze_slide` gives on the imported series. Against the run of the .svs: the DICOM
series carries the .svs's own JPEG tiles (OrthancWSIDicomizer does not re-encode them; level-0 pixels equal), but
the .svs is read by the direct TIFF path, which decodes JPEG at 1/2 scale in the DCT, where the DICOM series goes
through OpenSlide's full decode and an area resize; with the shipped model that moved the heatmap by 0.0044 on
average and 0.169 at most (measured here), so the bounds are 3/254 mean and 64/254 per cell, the union of the
positive regions within IoU 0.97 (measured 0.9935) and each region of at least 100 cells within 3 cells of the
.svs run's outline (measured 2.00 cells: region edges follow cells, so a flipped cell moves an edge by one).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
import tifffile
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient
from shapely.geometry import Polygon
from shapely.ops import unary_union

from model.runtime import Predictor
from service.analysis.pipeline import analyze_slide
from service.api import create_app
from service.constants import DEMO_MODEL_NAME
from service.jobs.worker import Worker
from service.outputs.dicom_results import SEG_MAX_FRACTIONAL, default_downsample
from service.settings import Settings
from tests.service.dicom.conftest import PASSWORD, USER, DicomizedSlide, Orthanc
from tests.service.shell import REPO_ROOT, make_settings

pytestmark = pytest.mark.redis

MEAN_TOL = 3 / 254  # heatmap against the .svs run (measured: see the module docstring)
MAX_TOL = 64 / 254
IOU_TOL = 0.97  # union of the positive regions against the .svs run
OUTLINE_TOL_CELLS = 3.0  # outline (Hausdorff) distance of each region of >= 100 cells to the .svs run's nearest


MODEL = REPO_ROOT / "model" / "weights" / f"{DEMO_MODEL_NAME}.onnx"  # the shipped default: real regions


@pytest.fixture()
def loop_settings(tmp_path: Path, redis_url: str, orthanc: Orthanc) -> Settings:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(MODEL, models / MODEL.name)
    return make_settings(tmp_path, redis_url, models, dicomweb_allowed_urls=orthanc.dicomweb,
                         dicomweb_auth=f"basic:{USER}:{PASSWORD}")


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(MODEL, threads=2)


@pytest.fixture(scope="module")
def file_run(tmp_path_factory: pytest.TempPathFactory, cmu_small_path: Path, predictor: Predictor) -> Path:
    """The same slide, as the .svs file, through the one-process pipeline with the same model and defaults."""
    out = tmp_path_factory.mktemp("file-run")
    analyze_slide(cmu_small_path, predictor, out)
    return out


def _level0(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        return tif.pages[0].asarray()


def _cells_at(cells: np.ndarray, size_wh: tuple[int, int], l0_per_px: float, hm_downsample: float) -> np.ndarray:
    rows = np.minimum(((np.arange(size_wh[1]) + 0.5) * l0_per_px / hm_downsample).astype(int), cells.shape[0] - 1)
    cols = np.minimum(((np.arange(size_wh[0]) + 0.5) * l0_per_px / hm_downsample).astype(int), cells.shape[1] - 1)
    return cells[np.ix_(rows, cols)]


def _outer_rings(geojson: dict[str, Any]) -> list[np.ndarray]:
    offset = np.asarray(geojson["metadata"]["frame"]["l0_offset_xy"], float)
    rings = []
    for f in geojson["features"]:
        if f["properties"]["objectType"] != "annotation":
            continue
        geom = f["geometry"]
        for poly in ([geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]):
            rings.append(np.asarray(poly[0], float)[:-1] + offset)
    return rings


def test_slide_from_orthanc_analysed_and_results_stored_back(
        loop_settings: Settings, orthanc: Orthanc, cmu_in_orthanc: DicomizedSlide, file_run: Path,
        predictor: Predictor, tmp_path: Path) -> None:
    ref = {"url": orthanc.dicomweb, "study_uid": cmu_in_orthanc.study_uid, "series_uid": cmu_in_orthanc.series_uid}
    with TestClient(create_app(loop_settings)) as client:
        # in: the API imports the series once over WADO-RS; the slide is then a stored DICOM slide
        resp = client.post("/v1/jobs", json={"dicomweb": ref})
        assert resp.status_code == 202, resp.text
        job = resp.json()
        slide = client.get(f"/v1/slides/{job['slide_id']}").json()
        assert slide["info"]["format"] == "dicom" and slide["info"]["l0_size_wh"] == [2220, 2967]
        assert slide["info"]["dicomweb"] == {**ref, "frame_of_reference_uid": cmu_in_orthanc.frame_of_reference_uid,
                                             "instances": 1}
        again = client.post("/v1/jobs", json={"dicomweb": ref})  # no second import, same job
        assert again.status_code == 200 and again.json()["job_id"] == job["job_id"]
        assert client.get(f"/v1/jobs/{job['job_id']}/dicom").status_code == 409  # not done yet

        Worker(loop_settings, name="dicom-test").run(burst=True)
        done = client.get(f"/v1/jobs/{job['job_id']}").json()
        assert done["state"] == "done", done
        assert done["links"]["dicom"] == f"/v1/jobs/{job['job_id']}/dicom"

        # out: STOW-RS back into the archive the slide came from
        stored = client.post(f"/v1/jobs/{job['job_id']}/dicom/store")
        assert stored.status_code == 200, stored.text
        answer = stored.json()
        assert answer["url"] == orthanc.dicomweb and answer["study_uid"] == cmu_in_orthanc.study_uid
        assert answer["new_study"] is False and len(answer["stored"]) == 3  # one segmentation level, ann, sr
        assert client.post(f"/v1/jobs/{job['job_id']}/dicom/store").json()["stored"] == answer["stored"]
        job_folder = loop_settings.jobs_dir / job["job_id"]

    # read back from Orthanc over QIDO-RS and WADO-RS, with a client of its own
    web = DICOMwebClient(orthanc.dicomweb)
    web._session.auth = (USER, PASSWORD)
    series = {s["00080060"]["Value"][0]: s["0020000E"]["Value"][0]
              for s in web.search_for_series(cmu_in_orthanc.study_uid)}
    assert set(series) == {"SM", "SEG", "ANN", "SR"}, series
    assert answer["series"] == {"segmentation": series["SEG"], "annotations": series["ANN"], "report": series["SR"]}
    seg_ds, = web.retrieve_series(cmu_in_orthanc.study_uid, series["SEG"])
    ann_ds, = web.retrieve_series(cmu_in_orthanc.study_uid, series["ANN"])
    sr_ds, = web.retrieve_series(cmu_in_orthanc.study_uid, series["SR"])

    # every object names the source series and its frame of reference
    for ds in (seg_ds, ann_ds, sr_ds):
        assert ds.StudyInstanceUID == cmu_in_orthanc.study_uid
    for ds in (seg_ds, ann_ds):
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == cmu_in_orthanc.series_uid
    # the annotations are 2D (the image's own pixel matrix): the IOD has a frame of reference only for 3D ones
    assert seg_ds.FrameOfReferenceUID == cmu_in_orthanc.frame_of_reference_uid and "FrameOfReferenceUID" not in ann_ds
    assert sr_ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID == \
        cmu_in_orthanc.series_uid

    # the segmentation's pixels are the job's heatmap exactly
    result = json.loads((job_folder / "result.json").read_text())
    hm_downsample = result["heatmap"]["hm_downsample"]
    factor = default_downsample(hm_downsample)
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    assert seg.SegmentationType == "FRACTIONAL" and seg.MaximumFractionalValue == SEG_MAX_FRACTIONAL
    assert seg.DimensionOrganizationType == "TILED_FULL"
    assert (seg.TotalPixelMatrixColumns, seg.TotalPixelMatrixRows) == (math.ceil(2220 / factor),
                                                                       math.ceil(2967 / factor))
    matrix = seg.get_total_pixel_matrix(combine_segments=False, rescale_fractional=False)  # (rows, cols, 2)
    expected = _cells_at(_level0(job_folder / "heatmap.tif"), (seg.TotalPixelMatrixColumns, seg.TotalPixelMatrixRows),
                         factor, hm_downsample).astype(int)
    assert np.array_equal(matrix[..., 0].astype(int), np.where(expected > 0, expected - 1, 0))
    assert np.array_equal(matrix[..., 1].astype(int), np.where(expected > 0, SEG_MAX_FRACTIONAL, 0))

    # the whole service path (import, queue, worker) is the one-process pipeline on the imported series, exactly
    dicom_run = tmp_path / "dicom-run"
    analyze_slide(loop_settings.slides_dir / job["slide_id"], predictor, dicom_run)
    assert np.array_equal(_level0(dicom_run / "heatmap.tif"), _level0(job_folder / "heatmap.tif"))
    def shapes(folder: Path) -> list[tuple[Any, Any]]:  # (ids hash the slide: the series here, one file there)
        features = json.loads((folder / "result.geojson").read_text())["features"]
        return [(f["geometry"], f["properties"].get("measurements")) for f in features]
    assert shapes(dicom_run) == shapes(job_folder)

    # the job's heatmap against the file-based run of the .svs
    file_cells, job_cells = _level0(file_run / "heatmap.tif"), _level0(job_folder / "heatmap.tif")
    assert file_cells.shape == job_cells.shape
    assert np.array_equal(file_cells > 0, job_cells > 0)  # the same cells analysed
    diff = np.abs(file_cells.astype(int) - job_cells.astype(int))[file_cells > 0] / 254
    print(f"heatmap vs the .svs run: mean |dp| {diff.mean():.4f}, max {diff.max():.4f}")
    assert diff.mean() <= MEAN_TOL and diff.max() <= MAX_TOL

    # the polygons are the job's regions in the slide's frame, with their measurements
    ann = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(ann_ds)
    group = ann.get_annotation_groups(label=ann.AnnotationGroupSequence[0].AnnotationGroupLabel)[0]
    polygons = group.get_graphic_data(coordinate_type="2D")
    job_rings = _outer_rings(json.loads((job_folder / "result.geojson").read_text()))
    assert len(polygons) == len(job_rings) > 0
    for got, want in zip(polygons, job_rings, strict=True):  # float32 coordinates: 0.01 px
        assert np.allclose(got, want, atol=0.01)
    names, values, _ = group.get_measurements()
    assert [n.meaning for n in names] == ["Area", "Mean foreground probability", "Maximum foreground probability"]
    assert values.shape == (len(polygons), 3) and np.all(values[:, 0] > 0) and np.all(values[:, 2] <= 1)

    # ... which are the file run's: the union of the regions nearly the same, each large region's outline close
    file_rings = _outer_rings(json.loads((file_run / "result.geojson").read_text()))
    mine, theirs = unary_union([Polygon(p) for p in polygons]), unary_union([Polygon(r) for r in file_rings])
    iou = mine.intersection(theirs).area / mine.union(theirs).area
    large = [p for p in polygons if Polygon(p).area >= 100 * hm_downsample**2]  # >= 100 cells
    distances = [min(Polygon(p).exterior.hausdorff_distance(Polygon(f).exterior) for f in file_rings) for p in large]
    print(f"{len(polygons)} regions from DICOM, {len(file_rings)} from the .svs run: union IoU {iou:.4f}; "
          f"{len(large)} regions of >= 100 cells, largest outline distance {max(distances):.1f} level-0 px "
          f"({max(distances) / hm_downsample:.2f} cells)")
    assert iou >= IOU_TOL and len(large) > 0 and max(distances) <= OUTLINE_TOL_CELLS * hm_downsample

    # the slide call, as the SR reports it, is the file run's
    file_result = json.loads((file_run / "result.json").read_text())
    items = {str(i.ConceptNameCodeSequence[0].CodeMeaning): i for i in _walk(sr_ds.ContentSequence)}
    call = items["Classification (attribute)"].ConceptCodeSequence[0]
    assert (call.CodingSchemeDesignator, call.CodeValue) == ("SCT", "21594007")  # Malignant
    assert call.CodeMeaning.lower() == file_result["classification"]["label"] == "malignant"
    assert abs(float(items["Probability"].MeasuredValueSequence[0].NumericValue)
               - file_result["classification"]["positive_probability"]) <= 0.05


def _walk(sequence: Any) -> Any:
    for item in sequence:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)
