"""Domain errors of the service shell; the API maps them to HTTP statuses in one place, with no HTTP here."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

__all__ = [
    "ServiceError",
    "NotFoundError",
    "SlideNotFound",
    "JobNotFound",
    "ModelNotFound",
    "ResultNotReady",
    "UploadTooLarge",
    "InvalidUpload",
    "InvalidRequest",
    "ModelUnavailable",
    "JobConflict",
    "QueueUnavailable",
    "PermanentJobError",
]


class ServiceError(Exception):
    """Base of every error the service reports to its users."""


class NotFoundError(ServiceError):
    """Something named by id does not exist."""


class SlideNotFound(NotFoundError):
    """No uploaded slide has this id (its SHA-256)."""


class JobNotFound(NotFoundError):
    """No job has this id."""


class ModelNotFound(NotFoundError):
    """No model of this name is in the models directory."""


class ResultNotReady(ServiceError):
    """The job has not produced this result (yet, or ever: it failed or was cancelled)."""


class UploadTooLarge(ServiceError):
    """The upload exceeds `PIXELCAM_MAX_UPLOAD_BYTES`."""


class InvalidUpload(ServiceError):
    """The uploaded bytes are not a slide this service can read."""


class InvalidRequest(ServiceError):
    """The request is well-formed JSON but cannot be served as asked."""


class ModelUnavailable(ServiceError):
    """The model exists but was refused (invalid metadata) or changed under a job."""


class JobConflict(ServiceError):
    """The job is in a state that does not allow the request (e.g. cancelling a finished job)."""


class QueueUnavailable(ServiceError):
    """Redis cannot be reached."""


class PermanentJobError(ServiceError):
    """A worker failure that retrying cannot fix; the job is marked failed with this message."""
