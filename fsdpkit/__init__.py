"""fsdpkit: the scaling core for giant vision models.

Public API: the model registry (:class:`ModelSpec`, :func:`get_model_spec`,
:func:`available_models`), meta-device summaries (:func:`summarize_model`) and the user-facing
errors. The multi-process test harness lives in :mod:`fsdpkit.testing`.
"""

from .errors import FsdpkitError, ModelNotFoundError, ModelSpecError
from .registry import (
    ENTRY_POINT_GROUP,
    ModelSpec,
    available_models,
    default_loss,
    get_model_spec,
)
from .summary import ModelSummary, count_forward_flops, summarize_model

__version__ = "0.1.0"

__all__ = [
    "ENTRY_POINT_GROUP",
    "FsdpkitError",
    "ModelNotFoundError",
    "ModelSpec",
    "ModelSpecError",
    "ModelSummary",
    "available_models",
    "count_forward_flops",
    "default_loss",
    "get_model_spec",
    "summarize_model",
]
