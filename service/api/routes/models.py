"""`/v1/models`: the models directory, uploads of new models and the default model (no restart needed)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import APIRouter, Query, Request, Response

from service.api.deps import ModelsDep, SettingsDep
from service.api.routes.slides import body_chunks
from service.api.schemas import DefaultModelUpdate, ErrorPublic, ModelPublic, ModelsPublic
from service.api.security import principal_of
from service.errors import Forbidden, ModelUnavailable, UploadTooLarge
from service.jobs.storage import ModelEntry, ModelRegistry

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/models", tags=["models"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorPublic}, 404: {"model": ErrorPublic}, 409: {"model": ErrorPublic},
    413: {"model": ErrorPublic}, 415: {"model": ErrorPublic},
}


def _require_admin(request: Request) -> None:
    """Models are shared by every key: changing them needs an admin key when admin keys are configured."""
    if not principal_of(request).admin:
        raise Forbidden("changing the models needs a key listed in PIXELCAM_ADMIN_KEYS; ask the server's operator")


def _default_or_none(models: ModelRegistry) -> str | None:
    try:
        return models.default()
    except ModelUnavailable:
        return None


def model_public(entry: ModelEntry, default: str | None) -> ModelPublic:
    """The API view of one model file."""
    return ModelPublic(name=entry.name, sha256=entry.sha256, size_bytes=entry.size_bytes, valid=entry.valid,
                       reason=entry.reason, default=entry.name == default, metadata=entry.metadata,
                       evaluation=entry.evaluation)


@router.get("", response_model=ModelsPublic)
def list_models(models: ModelsDep) -> ModelsPublic:
    """Every model file, valid or refused (with the reason), and the default."""
    default = _default_or_none(models)
    return ModelsPublic(default=default, models=[model_public(e, default) for e in models.entries()])


@router.get("/{name}", response_model=ModelPublic, responses=_ERRORS)
def get_model(name: str, models: ModelsDep) -> ModelPublic:
    """One servable model."""
    return model_public(models.get(name), _default_or_none(models))


@router.put("/default", response_model=ModelPublic, responses=_ERRORS)
def set_default_model(body: DefaultModelUpdate, request: Request, models: ModelsDep) -> ModelPublic:
    """Make a model the default for new jobs."""
    _require_admin(request)
    entry = models.set_default(body.name)
    return model_public(entry, entry.name)


@router.post("", response_model=ModelPublic, status_code=201, responses=_ERRORS)
async def upload_model(
    request: Request,
    response: Response,
    models: ModelsDep,
    settings: SettingsDep,
    name: str = Query(description="name to serve it under (letters, digits, '.', '_', '-')"),
) -> ModelPublic:
    """Add an `.onnx` model (raw body); it is validated against the model contract before it is listed."""
    _require_admin(request)
    models.root.mkdir(parents=True, exist_ok=True)
    tmp = models.root / f".upload-{uuid.uuid4().hex}.onnx.tmp"
    size = 0
    try:
        with tmp.open("wb") as fh:
            async for data in body_chunks(request, settings.upload_idle_timeout_s):
                size += len(data)
                if size > settings.max_upload_bytes:
                    raise UploadTooLarge(f"model upload exceeds {settings.max_upload_bytes} bytes "
                                         "(PIXELCAM_MAX_UPLOAD_BYTES)")
                fh.write(data)
        entry = models.add(name, tmp)
    finally:
        tmp.unlink(missing_ok=True)
    response.headers["Location"] = f"/v1/models/{entry.name}"
    return model_public(entry, _default_or_none(models))
