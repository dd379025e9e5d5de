"""Pydantic models of the HTTP API, named by role (`JobCreate` in, `JobPublic` out)."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, create_model

from service.analysis.plan import option_specs
from service.slide.metadata import MPP_RANGE

logger = logging.getLogger(__name__)

__all__ = [
    "ErrorPublic",
    "file_response",
    "SlidePublic",
    "AnalysisOptionsIn",
    "JobCreate",
    "MPP_FIELD",
    "JobPublic",
    "JobsPublic",
    "ModelPublic",
    "ModelsPublic",
    "DefaultModelUpdate",
    "HealthPublic",
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


class JobCreate(BaseModel):
    """A request to analyse an uploaded slide."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    slide_id: str = Field(description="id returned by POST /v1/slides")
    model: str | None = Field(None, description="model name from GET /v1/models; default model when absent")
    mpp: float | None = MPP_FIELD
    options: AnalysisOptionsIn = Field(  # type: ignore[valid-type]
        default_factory=AnalysisOptionsIn, description="analysis options; unknown names are refused")


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
