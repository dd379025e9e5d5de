"""FastAPI dependencies as `Annotated` aliases: settings, queue, slide store and models, held by the app."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, Request

from service.jobs.queue import JobQueue
from service.jobs.storage import ModelRegistry, SlideStore
from service.jobs.training_queue import TrainingQueue
from service.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["SettingsDep", "QueueDep", "SlideStoreDep", "ModelsDep", "TrainingQueueDep"]


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings  # type: ignore[no-any-return]


def get_queue(request: Request) -> JobQueue:
    """The job queue opened by the app's lifespan."""
    return request.app.state.queue  # type: ignore[no-any-return]


def get_slide_store(request: Request) -> SlideStore:
    """The content-addressed slide store."""
    return request.app.state.slides  # type: ignore[no-any-return]


def get_models(request: Request) -> ModelRegistry:
    """The models directory."""
    return request.app.state.models  # type: ignore[no-any-return]


def get_training_queue(request: Request) -> TrainingQueue:
    """The training jobs' queue opened by the app's lifespan."""
    return request.app.state.training  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
SlideStoreDep = Annotated[SlideStore, Depends(get_slide_store)]
ModelsDep = Annotated[ModelRegistry, Depends(get_models)]
TrainingQueueDep = Annotated[TrainingQueue, Depends(get_training_queue)]
