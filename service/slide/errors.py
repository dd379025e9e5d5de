"""Errors of the slide layer: what can be wrong with a slide file, its resolution, or one of its tiles.

Every one is a `SlideError`, so a caller that only needs "this slide cannot be analysed" catches that; the API,
the CLI and the worker map them to a status, an exit code or a failed job in one place each.
"""

from __future__ import annotations

__all__ = ["MissingMppError", "SlideError", "SlideNotFoundError", "TileReadError", "UnsupportedSlideError"]


class SlideError(Exception):
    """Base of every slide problem the service core reports."""


class SlideNotFoundError(SlideError):
    """The path does not exist or cannot be read."""


class UnsupportedSlideError(SlideError):
    """The file is not a slide we can analyse; `code` is a short slug, `reason` the human explanation."""

    def __init__(self, reason: str, code: str = "unsupported") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class MissingMppError(SlideError):
    """No plausible microns-per-pixel in the slide; the message names the override."""


class TileReadError(SlideError):
    """One plan tile could not be read or decoded; `t_index` names it."""

    def __init__(self, t_index: int, message: str) -> None:
        super().__init__(message)
        self.t_index = t_index
