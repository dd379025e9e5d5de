"""The HTTP API of the service (FastAPI)."""

from __future__ import annotations

from service.api.app import create_app

__all__ = ["create_app"]
