"""fsdpkit: the scaling core for giant vision models.

Public API: the model registry (:class:`ModelSpec`, :func:`get_model_spec`,
:func:`available_models`), meta-device summaries (:func:`summarize_model`), plan-driven
activation checkpointing (:func:`apply_ac`), :class:`LARC` for sharded parameters,
:class:`CommCounter`, and the user-facing errors. The multi-process test harness lives in
:mod:`fsdpkit.testing`.
"""

from .ac import apply_ac, remove_ac
from .comm import CommCounter
from .errors import FsdpkitError, ModelNotFoundError, ModelSpecError
from .fsdp import FSDPPolicy, apply_fsdp, parallelize, set_prefetch
from .larc import LARC
from .registry import (
    ENTRY_POINT_GROUP,
    ModelSpec,
    available_models,
    default_loss,
    get_model_spec,
)
from .summary import ModelSummary, count_forward_flops, summarize_model
from .syncbn import SyncBatchNorm, convert_sync_batchnorm

__version__ = "0.1.0"

__all__ = [
    "ENTRY_POINT_GROUP",
    "LARC",
    "CommCounter",
    "FSDPPolicy",
    "FsdpkitError",
    "ModelNotFoundError",
    "ModelSpec",
    "ModelSpecError",
    "ModelSummary",
    "SyncBatchNorm",
    "apply_ac",
    "apply_fsdp",
    "available_models",
    "convert_sync_batchnorm",
    "count_forward_flops",
    "default_loss",
    "get_model_spec",
    "parallelize",
    "remove_ac",
    "set_prefetch",
    "summarize_model",
]
