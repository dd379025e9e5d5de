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
    "Unauthorized",
    "Forbidden",
    "RateLimited",
    "UploadTimeout",
    "JobLost",
    "ArchiveNotFound",
    "ArchiveUnavailable",
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


class Unauthorized(ServiceError):
    """No API key, or one the server does not know (only when `PIXELCAM_API_KEYS` is set)."""


class Forbidden(ServiceError):
    """The key is valid but may not do this (e.g. change the models without an admin key)."""


class RateLimited(ServiceError):
    """Too many requests (or unfinished jobs) for this key; retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UploadTimeout(ServiceError):
    """The client stopped sending an upload for longer than `PIXELCAM_UPLOAD_IDLE_TIMEOUT_S`."""


class JobLost(ServiceError):
    """The job's files exist but Redis has no record of it (Redis restarted without persistence)."""


class ArchiveNotFound(NotFoundError):
    """The DICOMweb archive answered, but has no such study or series."""


class ArchiveUnavailable(ServiceError):
    """A DICOMweb archive could not be reached, refused the credentials or failed (the reason is in the message)."""
