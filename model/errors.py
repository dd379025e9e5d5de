"""Domain exceptions of the model package (no torch here: the runtime and config import it)."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ExportError",
    "InputSizeError",
    "InvalidModelError",
    "ModelConfigError",
    "ModelError",
    "ParityError",
    "PretrainedWeightsError",
]


class ModelError(Exception):
    """Base class of every error raised by the `model` package."""


class ModelConfigError(ModelError, ValueError):
    """A `ModelConfig` (or its serialised dict) is invalid."""


class InputSizeError(ModelError, ValueError):
    """A tensor given to an encoder has a size the encoder cannot take."""


class PretrainedWeightsError(ModelError):
    """A local pretrained state dict does not fit the encoder."""


class CheckpointError(ModelError):
    """A training checkpoint is missing, unreadable or of an unknown format."""


class ExportError(ModelError):
    """The ONNX export failed or produced a graph that breaks the model contract."""


class ParityError(ExportError):
    """onnxruntime and torch disagree on the same tiles by more than the tolerance."""


class InvalidModelError(ModelError):
    """An `.onnx` artefact breaks the model contract (see docs/architecture.md)."""
