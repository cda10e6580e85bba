"""kitcore: the small base every fsdpkit package builds on, loadable without FSDP.

The user-facing errors, the model contract and registry (:class:`ModelSpec`,
:func:`get_model_spec`, :func:`discover_units`), the FSDP policy object the wrapper applies and
the planner reads (:class:`FSDPPolicy`), the one table of training dtypes, byte formatting, atomic
file writes and the console policy of every CLI. ``import kitcore`` loads torch, but no
``torch.distributed.fsdp`` module.
"""

from .console import run_command, stdout_console
from .errors import FsdpkitError, ModelNotFoundError, ModelSpecError
from .files import write_text_atomic
from .policy import FSDPPolicy
from .registry import (
    ENTRY_POINT_GROUP,
    ModelSpec,
    available_models,
    default_loss,
    discover_units,
    get_model_spec,
    module_spec,
)
from .units import DTYPES, dtype_of, format_bytes, parse_bytes

__all__ = [
    "DTYPES",
    "ENTRY_POINT_GROUP",
    "FSDPPolicy",
    "FsdpkitError",
    "ModelNotFoundError",
    "ModelSpec",
    "ModelSpecError",
    "available_models",
    "default_loss",
    "discover_units",
    "dtype_of",
    "format_bytes",
    "get_model_spec",
    "module_spec",
    "parse_bytes",
    "run_command",
    "stdout_console",
    "write_text_atomic",
]
