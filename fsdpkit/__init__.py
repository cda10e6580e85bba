"""fsdpkit: the scaling core for giant vision models.

Public API: plan-driven activation checkpointing (:func:`apply_ac`), FSDP2 sharding
(:func:`parallelize`, :func:`apply_fsdp`, :func:`set_prefetch`), SyncBatchNorm on any backend,
:class:`LARC` for sharded parameters, :class:`CommCounter`, meta-device summaries
(:func:`summarize_model`); and, re-exported from :mod:`kitcore` (the base every package shares,
which loads without FSDP), the model registry (:class:`ModelSpec`, :func:`get_model_spec`,
:func:`available_models`), :class:`FSDPPolicy` and the user-facing errors. The multi-process
test harness lives in :mod:`fsdpkit.testing`.
"""

from kitcore import (
    ENTRY_POINT_GROUP,
    FsdpkitError,
    FSDPPolicy,
    ModelNotFoundError,
    ModelSpec,
    ModelSpecError,
    available_models,
    default_loss,
    get_model_spec,
)

from .ac import apply_ac, remove_ac
from .comm import CommCounter
from .fsdp import apply_fsdp, parallelize, set_prefetch
from .larc import LARC
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
