"""Service settings: one pydantic-settings class read from `PIXELCAM_*` environment variables."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service import constants

logger = logging.getLogger(__name__)

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """Everything the API, the workers and `pixelcam serve` read from the environment."""

    model_config = SettingsConfigDict(env_prefix="PIXELCAM_", extra="ignore", frozen=True, populate_by_name=True)

    redis_url: str = Field(default="", description="Redis to join; empty: `pixelcam serve` starts a private one")
    redis_prefix: str = Field(default="pixelcam", description="prefix of every Redis key (several deployments per server)")
    storage_dir: Path = Field(default=Path("var"), description="shared storage: slides/, jobs/, models/, redis/")
    models_dir_override: Path | None = Field(
        default=None,
        validation_alias="PIXELCAM_MODELS_DIR",
        description="directory of .onnx models; default <storage_dir>/models (seeded with the demo model)",
    )
    default_model: str = Field(default="", description="model served when a job names none; empty: the demo model")
    max_upload_bytes: int = Field(default=20 * 1024**3, gt=0, description="largest accepted slide upload")
    workers: int = Field(default=1, ge=0, description="local worker processes started by `pixelcam serve`")
    trainers: int = Field(default=-1, ge=-1, description=(
        "local trainer processes started by `pixelcam serve` (each runs one training job at a time); -1: one "
        "when torch (the `train` extra) is importable, else none; 0: none"))
    trainer_lease_s: float = Field(default=constants.TRAINER_LEASE_S, gt=0, description=(
        "a running training job whose trainer has not renewed its lease for this long is failed with the reason "
        "(by the next trainer, or when the API is asked about it)"))
    training_threads: int = Field(default=0, ge=0, description="torch threads of a training run; 0: every core "
                                                               "the trainer may use")
    host: str = Field(default="127.0.0.1", description="address the API binds")
    port: int = Field(default=8000, ge=1, le=65535, description="port the API binds")
    chunk_size: int = Field(default=64, gt=0, description="tiles per queue message")
    retention_days: float = Field(default=0.0, ge=0, description=(
        "delete ended jobs this many days after they ended, and slides this long after their last upload once "
        "no job uses them (0: keep everything until it is deleted)"))
    retention_sweep_s: float = Field(default=3600.0, gt=0, description="how often the API looks for expired data")
    chunks_in_flight: int = Field(default=8, gt=0, description=(
        "chunks of one job on the queue at once; the next is queued as one finishes, so a huge job's backlog "
        "never stands in front of another job's chunks"))
    batch_size: int = Field(default=16, gt=0, description="tiles per inference batch")
    reader_processes: int = Field(default=0, ge=0, description="tile decoding processes per worker (TIFF slides); "
                                  "0: threads. Worth it with many cores and a GPU (docs/analysis.md)")
    threads: int = Field(default=0, ge=0, description="onnxruntime intra-op threads per worker; 0: every core the process may use")
    claim_idle_s: float = Field(default=constants.CLAIM_IDLE_S, gt=0, description="idle time after which a chunk is redone")
    heartbeat_s: float = Field(default=constants.HEARTBEAT_S, gt=0, description="how often a busy worker says it is alive")
    max_attempts: int = Field(default=constants.MAX_ATTEMPTS, gt=0, description="tries of one chunk before the job fails")
    block_ms: int = Field(default=constants.BLOCK_MS, gt=0, description="how long a worker waits on an empty queue")
    redis_timeout_s: float = Field(default=constants.REDIS_TIMEOUT_S, gt=0,
                                   description="longest wait for any Redis reply before the call fails (no hangs)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="log level of entrypoints")
    # security and limits (docs/reliability.md)
    api_keys: str = Field(default="", repr=False,
                          description="comma-separated bearer tokens; empty: the API is open to anyone who reaches it")
    admin_keys: str = Field(default="", repr=False,
                            description="comma-separated tokens (also valid as API keys) that may add models and "
                                        "change the default; empty: every key may")
    cors_origins: str = Field(default="", description="comma-separated origins allowed by CORS ('*' for any); empty: none")
    rate_limit_per_s: float = Field(default=0.0, ge=0, description="requests per second per key (or client); 0: no limit")
    rate_burst: int = Field(default=200, gt=0, description="requests a key may send at once before the rate applies")
    max_active_jobs_per_key: int = Field(default=0, ge=0, description="unfinished jobs per key; 0: no limit")
    upload_idle_timeout_s: float = Field(default=60.0, gt=0, description="an upload that sends nothing this long is dropped")
    max_tiles_per_job: int = Field(default=500_000, ge=0,
                                   description="a job planning more tiles fails with the reason; 0: no limit")
    shutdown_grace_s: float = Field(default=10.0, gt=0, le=600,
                                    description="on SIGTERM, open requests get this long before `pixelcam serve` "
                                                "closes them and exits")
    inspect_timeout_s: float = Field(default=60.0, gt=0, le=3600,
                                     description="longest a child process may take to open an uploaded slide; "
                                                 "beyond it the upload is refused (415) and the child killed")
    inspect_memory_mb: int = Field(default=4096, ge=0,
                                   description="address-space limit of that child in MiB; 0: no limit")
    # DICOMweb archives (docs/dicom.md)
    dicomweb_allowed_urls: str = Field(default="", description=(
        "comma-separated base URLs of the DICOMweb archives jobs may read slides from and results may be stored "
        "to (e.g. http://pacs:8042/dicom-web); empty: none"))
    dicomweb_auth: str = Field(default="", repr=False, description=(
        "credentials sent to those archives: 'bearer:<token>' or 'basic:<user>:<password>'; empty: none"))
    dicomweb_store_url: str = Field(default="", description=(
        "archive that POST /v1/jobs/{id}/dicom/store sends to when the job's slide did not come from one "
        "(must be allowed too); empty: such jobs must name one"))
    dicomweb_timeout_s: float = Field(default=60.0, gt=0, le=3600,
                                      description="longest wait for one answer (or one chunk of it) of an archive")

    @field_validator("redis_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value or any(ch in value for ch in " {}*?"):
            raise ValueError("PIXELCAM_REDIS_PREFIX must be a non-empty name without spaces, braces or wildcards")
        return value

    @model_validator(mode="after")
    def _check_keys(self) -> Settings:
        for key in self.api_key_list:
            if len(key) < 16 or any(ch.isspace() or ch in ",;" for ch in key):
                raise ValueError(
                    "every key of PIXELCAM_API_KEYS / PIXELCAM_ADMIN_KEYS must be at least 16 characters without "
                    "spaces, commas or semicolons; make them with `python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))'`"
                )
        return self

    @field_validator("dicomweb_auth")
    @classmethod
    def _check_dicomweb_auth(cls, value: str) -> str:
        kind, _, rest = value.partition(":")
        if value and not ((kind == "bearer" and rest) or (kind == "basic" and ":" in rest)):
            raise ValueError("PIXELCAM_DICOMWEB_AUTH must be 'bearer:<token>' or 'basic:<user>:<password>' "
                             "(or empty for none)")
        return value

    @model_validator(mode="after")
    def _check_timings(self) -> Settings:
        if self.heartbeat_s * 2 > self.claim_idle_s:
            raise ValueError(
                f"PIXELCAM_HEARTBEAT_S ({self.heartbeat_s}) must be at most half of PIXELCAM_CLAIM_IDLE_S "
                f"({self.claim_idle_s}), or busy workers lose their chunks to others"
            )
        if self.heartbeat_s * 2 > self.trainer_lease_s:
            raise ValueError(
                f"PIXELCAM_HEARTBEAT_S ({self.heartbeat_s}) must be at most half of PIXELCAM_TRAINER_LEASE_S "
                f"({self.trainer_lease_s}), or running training jobs are failed as if their trainer had died"
            )
        return self

    @property
    def models_dir(self) -> Path:
        """The models directory: `PIXELCAM_MODELS_DIR`, else `<storage_dir>/models`."""
        return self.models_dir_override or self.storage_dir / constants.MODELS_DIR

    @property
    def slides_dir(self) -> Path:
        """Where uploaded slides live: `<storage_dir>/slides/<sha256>/`."""
        return self.storage_dir / constants.SLIDES_DIR

    @property
    def jobs_dir(self) -> Path:
        """Where job outputs live: `<storage_dir>/jobs/<job_id>/`."""
        return self.storage_dir / constants.JOBS_DIR

    @property
    def training_dir(self) -> Path:
        """Where training jobs live: `<storage_dir>/training/<training_id>/`."""
        return self.storage_dir / constants.TRAINING_DIR

    @property
    def api_key_list(self) -> list[str]:
        """The configured API keys (admin keys included); empty when the API is open."""
        keys = _split(self.api_keys) + _split(self.admin_keys)
        return list(dict.fromkeys(keys))

    @property
    def admin_key_list(self) -> list[str]:
        """Keys allowed to change the models directory; empty: every key."""
        return _split(self.admin_keys)

    @property
    def dicomweb_allowed_list(self) -> list[str]:
        """Base URLs of the DICOMweb archives that may be used (no trailing slash); empty: none."""
        return [url.rstrip("/") for url in _split(self.dicomweb_allowed_urls)]

    @property
    def cors_origin_list(self) -> list[str]:
        """Origins that browsers may call the API from."""
        return _split(self.cors_origins)

    def to_env(self) -> dict[str, str]:
        """These settings as `PIXELCAM_*` environment variables (for worker processes started from here)."""
        env = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if value is None:
                continue
            var = info.validation_alias if isinstance(info.validation_alias, str) else f"PIXELCAM_{name.upper()}"
            env[var] = str(value)
        return env

    def key(self, name: str, **fields: object) -> str:
        """A Redis key: the prefix plus one of the names in `service.constants`, formatted with `fields`."""
        return f"{self.redis_prefix}:{name.format(**fields)}"


def _split(text: str) -> list[str]:
    """Comma-separated items, stripped, empty ones dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
