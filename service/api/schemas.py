"""Pydantic models of the HTTP API, named by role (`JobCreate` in, `JobPublic` out)."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, create_model, model_validator

from service.analysis.plan import option_specs
from service.jobs.storage import MODEL_NAME_PATTERN
from service.jobs.training_config import TRAINER_FIELDS, config_fields
from service.slide.metadata import MPP_RANGE

logger = logging.getLogger(__name__)

__all__ = [
    "ErrorPublic",
    "file_response",
    "SlidePublic",
    "AnalysisOptionsIn",
    "JobCreate",
    "DicomwebRefIn",
    "DicomStoreIn",
    "DicomStorePublic",
    "MPP_FIELD",
    "JobPublic",
    "JobsPublic",
    "ModelPublic",
    "ModelsPublic",
    "DefaultModelUpdate",
    "HealthPublic",
    "TrainConfigIn",
    "TrainingSlideIn",
    "TrainingJobCreate",
    "TrainingJobPublic",
    "TrainingJobsPublic",
]


def file_response(description: str, *media_types: str) -> dict[int | str, dict[str, Any]]:
    """An OpenAPI 200 for a route that answers bytes, not JSON: its media types (binary unless text)."""
    def schema(media: str) -> dict[str, str]:
        textual = media.startswith("text/") or media.endswith(("xml", "json"))
        return {"type": "string"} if textual else {"type": "string", "format": "binary"}
    return {200: {"description": description, "content": {m: {"schema": schema(m)} for m in media_types}}}


class ErrorPublic(BaseModel):
    """Every error response: what went wrong and how to fix it."""

    error: str = Field(description="error type, e.g. JobNotFound")
    detail: str = Field(description="what went wrong and how to fix it")


class SlidePublic(BaseModel):
    """An uploaded slide."""

    slide_id: str = Field(description="SHA-256 of the file's bytes")
    filename: str = Field(description="the name it was uploaded under (display only)")
    size_bytes: int
    created: bool = Field(description="false when these bytes had been uploaded before (nothing was stored)")
    info: dict[str, Any] = Field(description="what the slide reader found: sizes, levels, mpp and its source")
    links: dict[str, str] = Field(default_factory=dict)


def _options_model() -> type[BaseModel]:
    """The request's `options` object, field by field from the core's `OptionSpec`s (one definition of the
    types and ranges: the same ones `AnalysisOptions` checks, here shown in OpenAPI and checked at submit)."""
    fields: dict[str, Any] = {}
    for name, (default, spec) in option_specs().items():
        # strict: "1" is not a number nor 1 a boolean (a strict float still takes an integer)
        kind: Any = Literal[spec.choices] if spec.choices else Annotated[spec.kind, Strict()]  # type: ignore[valid-type]
        if spec.nullable:
            kind = kind | None
        note = " Set by each worker from its own settings; ignored here." if spec.worker else ""
        fields[name] = (kind, Field(default, ge=spec.ge, gt=spec.gt, le=spec.le, lt=spec.lt, description=spec.description + note))
    config = ConfigDict(extra="forbid", title="AnalysisOptionsIn")
    return create_model("AnalysisOptionsIn", __config__=config, **fields)


AnalysisOptionsIn = _options_model()
# the API's `mpp` (an override of the slide's microns per pixel), in the one range the slide layer accepts
MPP_FIELD: Any = Field(None, ge=MPP_RANGE[0], le=MPP_RANGE[1],
                       description="override the slide's microns per level-0 pixel")


UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"  # a DICOM UID: digits and dots, at most 64 characters


class DicomwebRefIn(BaseModel):
    """A slide in a DICOMweb archive: the series of its pyramid."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2000, pattern=r"^https?://[^\s]+$", description=(
        "the archive's DICOMweb base URL (e.g. http://pacs:8042/dicom-web); it must lie under one of the "
        "server's PIXELCAM_DICOMWEB_ALLOWED_URLS; credentials come from the server's settings, never from here"))
    study_uid: str = Field(max_length=64, pattern=UID_PATTERN, description="Study Instance UID")
    series_uid: str = Field(max_length=64, pattern=UID_PATTERN, description="Series Instance UID of the slide")


class JobCreate(BaseModel):
    """A request to analyse a slide: an uploaded one (`slide_id`) or one in a DICOMweb archive (`dicomweb`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    slide_id: str | None = Field(default=None, description="id returned by POST /v1/slides (or give `dicomweb`)")
    dicomweb: DicomwebRefIn | None = Field(default=None, description=(
        "a DICOMweb series instead of `slide_id`: imported once into the slide store over WADO-RS "
        "(docs/dicom.md)"))
    model: str | None = Field(None, description="model name from GET /v1/models; default model when absent")
    mpp: float | None = MPP_FIELD
    options: AnalysisOptionsIn = Field(  # type: ignore[valid-type]
        default_factory=AnalysisOptionsIn, description="analysis options; unknown names are refused")

    @model_validator(mode="after")
    def _one_slide(self) -> JobCreate:
        if (self.slide_id is None) == (self.dicomweb is None):
            raise ValueError("name the slide with exactly one of slide_id (from POST /v1/slides) or dicomweb "
                             "({\"url\", \"study_uid\", \"series_uid\"})")
        return self


class DicomStoreIn(BaseModel):
    """Where to store a job's DICOM results."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, max_length=2000, pattern=r"^https?://[^\s]+$", description=(
        "DICOMweb base URL to STOW-RS to (an allowed one); default: the archive the slide came from, else "
        "PIXELCAM_DICOMWEB_STORE_URL"))
    downsample: int | None = Field(default=None, ge=1, le=1024, description=(
        "level-0 pixels per pixel of the segmentation's base level; default the largest power of 2 within a "
        "heatmap cell"))


class DicomStorePublic(BaseModel):
    """What the archive took."""

    url: str = Field(description="the archive the objects were sent to")
    study_uid: str = Field(description="the study they belong to (the source slide's, or a new one)")
    new_study: bool = Field(description="true when the slide was not DICOM: the objects start a new study and "
                                        "frame of reference")
    stored: list[str] = Field(description="SOP Instance UIDs the archive confirmed")
    series: dict[str, str] = Field(description="Series Instance UID per kind: segmentation, annotations, report")


class JobPublic(BaseModel):
    """A job's state and progress."""

    model_config = ConfigDict(protected_namespaces=())

    job_id: str
    slide_id: str
    model: str
    model_sha256: str
    state: str = Field(description="queued, running, stitching, done, failed or cancelled")
    tiles_done: int
    tiles_total: int | None = Field(description="tissue tiles to analyse; null until the plan is made")
    chunks_done: int
    chunks_total: int | None
    progress: float = Field(description="fraction of tiles done, 0..1")
    throughput_tiles_per_s: float | None
    eta_s: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None = Field(description="why the job failed")
    workers: dict[str, int] = Field(default_factory=dict, description="chunks finished by each worker")
    timings_s: dict[str, float] = Field(default_factory=dict, description="seconds per finished stage: plan, stitch")
    mpp: float | None
    options: dict[str, Any]
    links: dict[str, str] = Field(default_factory=dict)


class JobsPublic(BaseModel):
    """Recent jobs, newest first."""

    jobs: list[JobPublic]


class ModelPublic(BaseModel):
    """One file of the models directory."""

    name: str
    sha256: str
    size_bytes: int
    valid: bool
    reason: str = Field(description="why the model was refused; empty when valid")
    default: bool
    metadata: dict[str, Any]
    evaluation: dict[str, Any] | None = Field(None, description=(
        "for a model a training job of this service made: the job's id and its evaluation on the held-out "
        "slides (`slide_path`: slide accuracy and PxAP of the slide heatmaps, as `pixelcam analyze` computes them; "
        "`results`: the recipe's per-model scores); null otherwise"))


class ModelsPublic(BaseModel):
    """The models directory."""

    default: str | None
    models: list[ModelPublic]


class DefaultModelUpdate(BaseModel):
    """Choose the default model."""

    name: str


class HealthPublic(BaseModel):
    """Liveness or readiness."""

    status: str
    checks: dict[str, str] = Field(default_factory=dict)


class _TrainConfigBase(BaseModel):
    """Refuses the trainer's own fields and unknown names with a message that lists what may be set."""

    model_config = ConfigDict(extra="forbid", title="TrainConfigIn")

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            reserved = sorted(set(data) & set(TRAINER_FIELDS))
            if reserved:
                raise ValueError(f"{', '.join(reserved)}: set by the trainer for every job "
                                 f"({'; '.join(TRAINER_FIELDS[n] for n in reserved)}); leave them out")
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown field(s) {', '.join(unknown)}; a training job may set: "
                                 f"{', '.join(cls.model_fields)}")
        return data


def _train_config_model() -> type[BaseModel]:
    """The request's `config`, field by field from the recipe's TrainConfig (types, defaults, the server's bounds),
    so that OpenAPI shows what may be set; the recipe's own checks run at submit too."""
    kinds: dict[type, Any] = {int: Annotated[int, Strict()], float: Annotated[float, Strict()],
                              bool: Annotated[bool, Strict()], str: Annotated[str, Strict()],
                              list: list[Annotated[str, Strict()]]}
    fields: dict[str, Any] = {}
    for spec in config_fields():
        kind = kinds.get(spec.kind, Any)
        note = "TrainConfig field (training/config.py); the default shown is the recipe's without `quick`"
        fields[spec.name] = (kind, Field(spec.default, ge=spec.ge, le=spec.le, description=note))
    return create_model("TrainConfigIn", __base__=_TrainConfigBase, **fields)


TrainConfigIn = _train_config_model()


class TrainingSlideIn(BaseModel):
    """One slide of a training job."""

    model_config = ConfigDict(extra="forbid")

    slide_id: str = Field(description="id returned by POST /v1/slides")
    label: str = Field(description="the slide's class: one of the config's class_names (default benign, malignant)")
    # any JSON here, so that a document of the wrong kind gets the service's own message (what to export instead)
    annotations: Any = Field(None, json_schema_extra={"type": ["object", "null"]}, description=(
        "optional QuPath GeoJSON FeatureCollection in level-0 pixels (File > Export objects as GeoJSON); regions "
        "whose classification is the config's foreground_name (default Gland) score the heatmaps"))
    mpp: float | None = MPP_FIELD


class TrainingJobCreate(BaseModel):
    """A request to train a model on uploaded slides."""

    model_config = ConfigDict(extra="forbid")

    slides: list[TrainingSlideIn] = Field(min_length=1, max_length=10_000,
                                          description="the slides, with a label each; every class needs one")
    config: TrainConfigIn = Field(  # type: ignore[valid-type]
        default_factory=TrainConfigIn, description="TrainConfig fields, e.g. {\"quick\": true} or {\"epochs\": 5}")
    name: str | None = Field(None, pattern=MODEL_NAME_PATTERN, description=(
        "name of the model it registers (letters, digits, '.', '_', '-'); default trained-<first 12 digits of "
        "the id>"))


class TrainingJobPublic(BaseModel):
    """A training job's state and progress."""

    model_config = ConfigDict(protected_namespaces=())

    id: str
    name: str = Field(description="the model name it registers when done")
    state: str = Field(description="queued, running, done, failed or cancelled")
    stage: str | None = Field(description="the recipe's current stage (extract, baseline, cams, pixelcam, evaluate, "
                                          "export)")
    stages: list[str] = Field(default_factory=list, description="the stages this run goes through")
    stage_index: int | None
    epoch: int | None = Field(description="epoch of the current stage, when it has epochs")
    epochs: int | None
    progress: float = Field(description="fraction of the whole run done, 0..1")
    metrics: dict[str, Any] = Field(default_factory=dict, description="latest metrics, e.g. valcl_acc, valpx_pxap")
    message: str | None = Field(description="what the recipe is doing now")
    error: str | None = Field(description="why the job failed")
    model: str | None = Field(description="the model it registered (done jobs): use it in POST /v1/jobs")
    model_sha256: str | None
    evaluation: dict[str, Any] | None = Field(description="the held-out slides' scores (done jobs)")
    slides: int = Field(description="how many slides it trains on")
    classes: dict[str, int] = Field(default_factory=dict, description="slides per class")
    config: dict[str, Any] = Field(default_factory=dict, description="the config fields the request set")
    trainer: str | None = Field(description="the trainer running (or that ran) it")
    created_at: float
    started_at: float | None
    finished_at: float | None
    links: dict[str, str] = Field(default_factory=dict)


class TrainingJobsPublic(BaseModel):
    """Recent training jobs, newest first."""

    training_jobs: list[TrainingJobPublic]
