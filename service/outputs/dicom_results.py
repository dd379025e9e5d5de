"""A finished analysis as DICOM objects (highdicom): a FRACTIONAL Segmentation pyramid of the foreground map, the
positive regions as Microscopy Bulk Simple Annotations, and the slide call as a Comprehensive SR (TID 1500).

Inputs are a job folder's own files (`heatmap.tif`, `result.json`, `result.geojson`) and the header of the slide's
level-0 DICOM image (`source_from_files`), or, for a slide that is not DICOM, a stand-in header made from the
slide's geometry (`stand_in_source`: a new study and frame of reference, UIDs derived from the slide's SHA-256).
Every object names the source's Study, Series, Frame of Reference and SOP instance; their own UIDs derive from a
seed (the job id), so exporting the same job twice gives the same objects and storing them again replaces nothing.

Encoding, chosen so that the segmentation holds exactly the heatmap's values:
- Segmentation: FRACTIONAL, Maximum Fractional Value 254, two segments: 1 = the foreground probability
  (stored value `v - 1` of heatmap.tif's `v`, so p = stored / 254 exactly), 2 = the analysed area (254 where the
  model looked, 0 elsewhere: heatmap.tif's 0 = "not analysed" stays distinct from "probability 0").
  Frame: the source image's total pixel matrix divided by an integer `downsample` D (pixel spacing D times the
  source's, same origin and orientation), each pixel the heatmap cell under its centre; TILED_FULL tiles; more
  instances of the same pyramid halve it down to one tile, a reduced pixel being the mean probability of the
  analysed pixels under it and the analysed fraction.
- Annotations: one POLYGON group of the regions' outer rings in the source's total pixel matrix ((column, row),
  (0, 0) the top-left corner of the top-left pixel: result.geojson's frame plus its `l0_offset_xy`), with the area
  (µm²) and mean/max probability per region; a second group holds the rings of their holes (DICOM polygons have
  none). A slide without a positive region gets no annotation object.
- SR: the slide call (class, positive-class probability, top-k method, tissue and positive area, region count) as
  a TID 1500 measurement report.

Planes: `l0_` level-0 slide pixels (the source's total pixel matrix), `hm_` heatmap cells, `sg_` pixels of a
segmentation level.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import tifffile
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, generate_uid

logger = logging.getLogger(__name__)

__all__ = ["DicomExportError", "DicomResults", "SEG_MAX_FRACTIONAL", "TILE", "default_downsample",
           "source_from_files", "stand_in_source", "build_dicom_results", "write_dicom_results",
           "PIXELCAM_SCHEME"]

TILE = 256
SEG_MAX_FRACTIONAL = 254  # stored = heatmap v - 1: p = stored / 254, exactly heatmap.tif's quantisation
MAX_SEG_PIXELS = 64 << 20  # base levels beyond this are refused: ask for a larger downsample
PIXELCAM_SCHEME = "99PIXELCAM"  # a private coding scheme (DICOM PS3.16 8.2) for what no standard code names
_UNITLESS = Code("1", "UCUM", "no units")
_MEAN_P = Code("MEAN-P", PIXELCAM_SCHEME, "Mean foreground probability")
_MAX_P = Code("MAX-P", PIXELCAM_SCHEME, "Maximum foreground probability")
_ANALYSED = Code("ANALYSED", PIXELCAM_SCHEME, "Area analysed by the model")
_HOLE = Code("HOLE", PIXELCAM_SCHEME, "Hole in a positive region")
_CLASS_CODES = {"malignant": codes.SCT.Malignant, "benign": codes.SCT.Benign}
_MANUFACTURER = "pixelcam"


class DicomExportError(ValueError):
    """The job's files cannot be written as DICOM as asked (bad downsample, missing or unusable inputs)."""


@dataclass(frozen=True)
class DicomResults:
    """The objects of one export, in the order they are written."""

    segmentations: list[Dataset]
    annotations: Dataset | None  # None when the slide has no positive region
    report: Dataset
    new_study: bool  # True when the source was a stand-in (the slide is not DICOM)

    @property
    def datasets(self) -> list[Dataset]:
        return [*self.segmentations, *([self.annotations] if self.annotations is not None else []), self.report]


def default_downsample(hm_downsample: float) -> int:
    """The largest power of two not above the heatmap cell (at least 1): every cell keeps at least one pixel."""
    return max(1, 2 ** int(math.floor(math.log2(max(hm_downsample, 1.0)))))


def _uid(seed: str, *parts: object) -> UID:
    return generate_uid(entropy_srcs=[seed, *map(str, parts)])


def source_from_files(paths: Sequence[Path]) -> Dataset:
    """The header (no pixels) of the level-0 image among a DICOM WSI series' files: the VOLUME image (or, without
    ImageType, any VL Whole Slide Microscopy image) with the largest total pixel matrix."""
    best: tuple[int, Dataset] | None = None
    for path in paths:
        try:
            with warnings.catch_warnings():  # over-long values of real scanners' files: read them as they are
                warnings.simplefilter("ignore", UserWarning)
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                ds.get("SOPClassUID"), ds.get("ImageType"), ds.get("FrameOfReferenceUID")  # converted here
        except (pydicom.errors.InvalidDicomError, OSError) as err:
            logger.debug("skipping %s: %s", path.name, err)
            continue
        if ds.get("SOPClassUID") != pydicom.uid.VLWholeSlideMicroscopyImageStorage:
            continue
        image_type = [str(v).upper() for v in ds.get("ImageType", [])]
        if image_type and len(image_type) > 2 and image_type[2] not in ("VOLUME",):
            continue
        size = int(ds.get("TotalPixelMatrixColumns", 0)) * int(ds.get("TotalPixelMatrixRows", 0))
        if best is None or size > best[0]:
            best = (size, ds)
    if best is None:
        raise DicomExportError("the slide's files hold no VL Whole Slide Microscopy volume image")
    return best[1]


def stand_in_source(*, l0_size_wh: tuple[int, int], mpp_xy: tuple[float, float], slide_sha256: str,
                    slide_name: str) -> Dataset:
    """The header highdicom needs to place derived objects on a slide that is not DICOM: a VL Whole Slide
    Microscopy volume image of the slide's geometry in a new study and frame of reference. It is never written or
    sent; its UIDs derive from the slide's SHA-256, so every export of one slide shares study and frame."""
    ds = Dataset()
    ds.SOPClassUID = pydicom.uid.VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID = _uid(slide_sha256, "image")
    ds.StudyInstanceUID = _uid(slide_sha256, "study")
    ds.SeriesInstanceUID = _uid(slide_sha256, "series")
    ds.FrameOfReferenceUID = _uid(slide_sha256, "frame-of-reference")
    ds.Modality = "SM"
    ds.PatientID = slide_sha256[:16]
    ds.PatientName = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.ReferringPhysicianName = ""
    ds.ContainerIdentifier = slide_name[:64] or slide_sha256[:16]
    ds.IssuerOfTheContainerIdentifierSequence = []
    ds.ContainerTypeCodeSequence = []
    specimen = Dataset()
    specimen.SpecimenIdentifier = ds.ContainerIdentifier
    specimen.SpecimenUID = _uid(slide_sha256, "specimen")
    specimen.IssuerOfTheSpecimenIdentifierSequence = []
    specimen.SpecimenPreparationSequence = []
    ds.SpecimenDescriptionSequence = [specimen]
    ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = int(l0_size_wh[0]), int(l0_size_wh[1])
    ds.Columns = ds.Rows = TILE
    ds.NumberOfFrames = math.ceil(l0_size_wh[0] / TILE) * math.ceil(l0_size_wh[1] / TILE)
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 0
    origin.YOffsetInSlideCoordinateSystem = 0
    ds.TotalPixelMatrixOriginSequence = [origin]
    measures = Dataset()
    measures.PixelSpacing = [round(mpp_xy[1] / 1000.0, 12), round(mpp_xy[0] / 1000.0, 12)]  # (row, column) in mm
    measures.SliceThickness = 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    return ds


def _source_spacing_mm(source: Dataset) -> tuple[float, float]:
    """(row, column) spacing of the source's total pixel matrix in mm."""
    try:
        spacing = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        return float(spacing[0]), float(spacing[1])
    except (AttributeError, IndexError, KeyError) as err:
        raise DicomExportError("the source image has no pixel spacing (shared functional groups); it cannot "
                               "place a segmentation") from err


def _source_thickness_mm(source: Dataset) -> float | None:
    """The source's slice thickness in mm (the segmentation keeps it), if it states one."""
    try:
        value = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].get("SliceThickness")
    except (AttributeError, IndexError):
        return None
    return float(value) if value not in (None, "") else None


def _read_heatmap(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        cells = tif.pages[0].asarray()
    if cells.dtype != np.uint8 or cells.ndim != 2:
        raise DicomExportError(f"{path.name} is not pixelcam's uint8 heatmap ({cells.dtype}, {cells.shape})")
    return cells


def _resample(cells: np.ndarray, sg_size_wh: tuple[int, int], l0_per_px: float, hm_downsample: float) -> np.ndarray:
    """The heatmap cell under each pixel's centre (heatmap.tif's values), for a level of `l0_per_px`."""
    hm_h, hm_w = cells.shape
    w, h = sg_size_wh
    rows = np.minimum(((np.arange(h) + 0.5) * l0_per_px / hm_downsample).astype(np.int64), hm_h - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * l0_per_px / hm_downsample).astype(np.int64), hm_w - 1)
    return cells[np.ix_(rows, cols)]


def _levels(values: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(probability sum weights) pyramid: per level the mean probability of the analysed pixels and the analysed
    fraction, halving (2 x 2 blocks, edges padded as not analysed) until one tile holds the level."""
    analysed = (values > 0).astype(np.float64)
    prob = np.where(values > 0, (values.astype(np.float64) - 1.0) / 254.0, 0.0)
    out = [(prob, analysed)]
    weight_sum, prob_sum = analysed, prob * analysed
    while max(weight_sum.shape) > TILE:
        h, w = weight_sum.shape
        pad = ((0, h % 2), (0, w % 2))
        weight_sum = np.pad(weight_sum, pad).reshape((h + 1) // 2, 2, (w + 1) // 2, 2).sum(axis=(1, 3))
        prob_sum = np.pad(prob_sum, pad).reshape((h + 1) // 2, 2, (w + 1) // 2, 2).sum(axis=(1, 3))
        mean = np.divide(prob_sum, weight_sum, out=np.zeros_like(prob_sum), where=weight_sum > 0)
        out.append((mean, weight_sum / 4.0))
    return out


def _algorithm(model_name: str, model_sha256: str) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(name=f"PixelCAM {model_name}"[:64], family=codes.cid7162.ArtificialIntelligence,
                                              version=model_sha256[:16], source="pixelcam")


def _software(result: dict[str, Any]) -> str:
    return str(result.get("provenance", {}).get("software", {}).get("pixelcam", "0"))


def _segmentations(source: Dataset, result: dict[str, Any], cells: np.ndarray, downsample: int, seed: str,
                   fg_name: str, algorithm: hd.AlgorithmIdentificationSequence) -> list[Dataset]:
    hm = result["heatmap"]
    hm_downsample = float(hm["hm_downsample"])
    l0_w, l0_h = int(source.TotalPixelMatrixColumns), int(source.TotalPixelMatrixRows)
    if [l0_w, l0_h] != [int(v) for v in hm["l0_size_wh"]]:
        raise DicomExportError(f"the source image's total pixel matrix ({l0_w} x {l0_h}) is not the analysed "
                               f"slide's level 0 ({hm['l0_size_wh'][0]} x {hm['l0_size_wh'][1]})")
    sg_w, sg_h = math.ceil(l0_w / downsample), math.ceil(l0_h / downsample)
    if sg_w * sg_h > MAX_SEG_PIXELS:
        raise DicomExportError(f"downsample {downsample} gives a {sg_w} x {sg_h} segmentation, above the "
                               f"{MAX_SEG_PIXELS} pixels allowed; ask for a larger downsample")
    row_mm, col_mm = _source_spacing_mm(source)
    thickness = _source_thickness_mm(source)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=1, segment_label=f"{fg_name} probability"[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=Code("FG", PIXELCAM_SCHEME, fg_name[:64] or "Foreground"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm),
        hd.seg.SegmentDescription(
            segment_number=2, segment_label="Analysed area", segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=_ANALYSED, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm),
    ]
    base = _resample(cells, (sg_w, sg_h), float(downsample), hm_downsample)
    series_uid, pyramid_uid = _uid(seed, "seg-series"), _uid(seed, "seg-pyramid")
    out: list[Dataset] = []
    for k, (prob, analysed) in enumerate(_levels(base)):
        factor = downsample * 2**k
        # float sums may pass 1 by an ulp; highdicom takes [0, 1] only
        stack = np.clip(np.stack([prob, analysed], axis=-1), 0.0, 1.0).astype(np.float32)[np.newaxis]
        seg = hd.seg.Segmentation(
            source_images=[source], pixel_array=stack,
            segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL, segment_descriptions=descriptions,
            series_instance_uid=series_uid, series_number=901, sop_instance_uid=_uid(seed, "seg", k),
            instance_number=k + 1, manufacturer=_MANUFACTURER, manufacturer_model_name="pixelcam",
            software_versions=_software(result), device_serial_number="0",
            fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
            max_fractional_value=SEG_MAX_FRACTIONAL, content_label="PIXELCAM_FG",
            content_description=f"PixelCAM foreground map, level {k}: {factor} level-0 px per pixel"[:64],
            pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=(row_mm * factor, col_mm * factor),
                                                    slice_thickness=thickness),
            tile_pixel_array=True, tile_size=(TILE, TILE), omit_empty_frames=False,
            dimension_organization_type=hd.DimensionOrganizationTypeValues.TILED_FULL,
            pyramid_uid=pyramid_uid, pyramid_label="PixelCAM foreground map",
            transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        )
        # General Image: Type 2C, required (empty) where no patient orientation applies, as for the slide itself;
        # highdicom leaves it out
        seg.PatientOrientation = ""
        out.append(seg)
    return out


def _rings(geometry: dict[str, Any]) -> list[list[list[list[float]]]]:
    kind, coords = geometry.get("type"), geometry.get("coordinates") or []
    if kind == "Polygon":
        return [coords]
    if kind == "MultiPolygon":
        return list(coords)
    return []


def _ring_points(ring: list[list[float]], offset: tuple[float, float]) -> np.ndarray:
    pts = np.asarray(ring, dtype=np.float64).reshape(-1, 2) + np.asarray(offset, dtype=np.float64)
    if len(pts) > 1 and np.array_equal(pts[0], pts[-1]):
        pts = pts[:-1]  # DICOM polygons close implicitly: the first point is not repeated
    return pts


def _annotations(source: Dataset, result: dict[str, Any], geojson: dict[str, Any], seed: str, fg_name: str,
                 algorithm: hd.AlgorithmIdentificationSequence) -> Dataset | None:
    offset = tuple(float(v) for v in geojson.get("metadata", {}).get("frame", {}).get("l0_offset_xy", [0, 0]))
    polygons: list[np.ndarray] = []
    holes: list[np.ndarray] = []
    area, mean_p, max_p = [], [], []
    for feature in geojson.get("features", []):
        props = feature.get("properties", {})
        if props.get("objectType") != "annotation":
            continue
        m = props.get("measurements", {})
        for polygon in _rings(feature.get("geometry") or {}):
            outer = _ring_points(polygon[0], offset)  # type: ignore[arg-type]
            if len(outer) < 3:
                continue
            polygons.append(outer)
            # a MultiPolygon's measurements are the region's, repeated on each of its parts
            area.append(float(m.get("Area µm^2", np.nan)))
            mean_p.append(float(m.get("Mean probability", np.nan)))
            max_p.append(float(m.get("Max probability", np.nan)))
            holes.extend(h for h in (_ring_points(r, offset) for r in polygon[1:]) if len(h) >= 3)  # type: ignore[arg-type]
    category, prop = codes.SCT.MorphologicallyAbnormalStructure, Code("FG", PIXELCAM_SCHEME, fg_name[:64] or "Foreground")
    groups = []
    if polygons:
        groups.append(hd.ann.AnnotationGroup(
            number=1, uid=_uid(seed, "ann-group", 1), label=f"{fg_name} regions"[:64],
            annotated_property_category=category, annotated_property_type=prop,
            graphic_type=hd.ann.GraphicTypeValues.POLYGON, graphic_data=polygons,
            algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            description=f"positive regions: probability >= {result.get('evidence', {}).get('threshold')}"[:64],
            measurements=[
                hd.ann.Measurements(name=codes.SCT.Area, values=np.asarray(area, np.float32),
                                    unit=codes.UCUM.SquareMicrometer),
                hd.ann.Measurements(name=_MEAN_P, values=np.asarray(mean_p, np.float32), unit=_UNITLESS),
                hd.ann.Measurements(name=_MAX_P, values=np.asarray(max_p, np.float32), unit=_UNITLESS),
            ]))
    if holes:
        groups.append(hd.ann.AnnotationGroup(
            number=len(groups) + 1, uid=_uid(seed, "ann-group", 2), label=f"{fg_name} region holes"[:64],
            annotated_property_category=category, annotated_property_type=_HOLE,
            graphic_type=hd.ann.GraphicTypeValues.POLYGON, graphic_data=holes,
            algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, description="holes of the positive regions"))
    if not groups:  # no positive region: no annotation object (a group must hold annotations); the SR says 0
        return None
    return hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[source], annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD,
        annotation_groups=groups, series_instance_uid=_uid(seed, "ann-series"), series_number=902,
        sop_instance_uid=_uid(seed, "ann"), instance_number=1, manufacturer=_MANUFACTURER,
        manufacturer_model_name="pixelcam", software_versions=_software(result), device_serial_number="0",
        content_label="PIXELCAM_REGIONS", content_description="PixelCAM positive regions",
        pixel_origin_interpretation=hd.ann.PixelOriginInterpretationValues.VOLUME,
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian)


def _class_code(label: str) -> Code:
    return _CLASS_CODES.get(label.lower(), Code(label.upper()[:16] or "NONE", PIXELCAM_SCHEME, label or "none"))


def _report(source: Dataset, result: dict[str, Any], seed: str, model_name: str, model_sha256: str) -> Dataset:
    cls = result.get("classification") or {}
    label = str(cls.get("label") or "")
    agg = cls.get("aggregation") or {}
    algorithm = hd.sr.AlgorithmIdentification(name=f"PixelCAM {model_name}"[:64], version=model_sha256[:16])
    measurements = []
    if cls.get("positive_probability") is not None:
        measurements.append(hd.sr.Measurement(
            name=codes.DCM.Probability, value=float(cls["positive_probability"]), unit=_UNITLESS,
            qualifier=None, algorithm_id=algorithm,
            method=Code("TOPK-MEAN", PIXELCAM_SCHEME, f"Mean of the top-{agg.get('k', 'k')} tile probabilities"[:64]),
            derivation=None))
    mm2 = Code("mm2", "UCUM", "square millimeter")
    for name, key, unit in (("Tissue area", "tissue_area_mm2", mm2), ("Positive area", "positive_area_mm2", mm2),
                            ("Positive regions", "regions", Code("{regions}", "UCUM", "regions"))):
        value = (result.get("evidence") or {}).get(key)
        if value is not None:
            measurements.append(hd.sr.Measurement(name=Code(key.upper()[:16], PIXELCAM_SCHEME, name), value=float(value),
                                                  unit=unit, algorithm_id=algorithm))
    evaluations = [hd.sr.QualitativeEvaluation(name=codes.SCT.Classification, value=_class_code(label))] if label else []
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(seed, "sr-tracking"), identifier="slide call"),
        algorithm_id=algorithm, measurements=measurements or None, qualitative_evaluations=evaluations or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid(seed, "device"), name="pixelcam", model_name=model_name[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=Code("PIXELCAM", PIXELCAM_SCHEME, "PixelCAM slide analysis"),
        imaging_measurements=[group])
    return hd.sr.ComprehensiveSR(
        evidence=[source], content=report[0], series_instance_uid=_uid(seed, "sr-series"), series_number=903,
        sop_instance_uid=_uid(seed, "sr"), instance_number=1, manufacturer=_MANUFACTURER, is_complete=True,
        series_description="PixelCAM slide call")


def build_dicom_results(job_folder: Path, source: Dataset, *, seed: str, downsample: int | None = None,
                        new_study: bool = False) -> DicomResults:
    """The DICOM objects of a finished job folder, placed on `source` (the slide's level-0 image header)."""
    folder = Path(job_folder)
    try:
        result = json.loads((folder / "result.json").read_text())
        geojson = json.loads((folder / "result.geojson").read_text())
    except (OSError, ValueError) as err:
        raise DicomExportError(f"the job's result.json or result.geojson is missing or unreadable ({err})") from err
    hm_downsample = float(result["heatmap"]["hm_downsample"])
    downsample = default_downsample(hm_downsample) if downsample is None else int(downsample)
    if downsample < 1:
        raise DicomExportError(f"downsample must be a positive integer, got {downsample}")
    meta = result.get("provenance", {}).get("model", {}).get("metadata", {})
    fg_name = str((meta.get("foreground") or {}).get("name") or "Foreground")
    model_sha = str(result.get("provenance", {}).get("model", {}).get("sha256", ""))
    model_name = str(meta.get("encoder") or "model")
    algorithm = _algorithm(model_name, model_sha)
    cells = _read_heatmap(folder / "heatmap.tif")
    segs = _segmentations(source, result, cells, downsample, seed, fg_name, algorithm)
    ann = _annotations(source, result, geojson, seed, fg_name, algorithm)
    sr = _report(source, result, seed, model_name, model_sha)
    return DicomResults(segs, ann, sr, new_study)


def write_dicom_results(results: DicomResults, out_dir: Path) -> list[Path]:
    """Write each object as a DICOM file (`seg-<level>.dcm`, `ann.dcm`, `sr.dcm`) into an existing folder."""
    names = [f"seg-{k}.dcm" for k in range(len(results.segmentations))]
    names += (["ann.dcm"] if results.annotations is not None else []) + ["sr.dcm"]
    paths = []
    for name, ds in zip(names, results.datasets, strict=True):
        path = Path(out_dir) / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
