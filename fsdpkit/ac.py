"""Activation checkpointing driven by a plan: each checkpointed segment of units becomes one
checkpointed region.

A plan names the model's units (``plan.units``, qualified module names in order) and splits
them into ``plan.segments`` of ``(start, end_exclusive, checkpointed)``. Units form a chain
(each unit's output is the next unit's input), so a segment ``[s, e)`` runs as one function:
unit ``s`` runs units ``s..e-1`` under ``torch.utils.checkpoint`` (non-reentrant) and units
``s+1..e-1`` pass their input through. Memory: only the segment's input is kept in forward; its
activations are recomputed in backward, at the cost of one more forward of the segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Protocol

from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import FsdpkitError

__all__ = ["CheckpointPlan", "apply_ac", "remove_ac"]


class CheckpointPlan(Protocol):
    """What :func:`apply_ac` reads from a plan (``planner.Plan`` satisfies it)."""

    units: Sequence[str]
    segments: Sequence[tuple[int, int, bool]]


def _identity(x: Any) -> Any:
    return x


def _run_segment(forwards: list, *args: Any) -> Any:
    def run(*inputs: Any) -> Any:
        x = forwards[0](*inputs)
        for f in forwards[1:]:
            x = f(x)
        return x

    return checkpoint(run, *args, use_reentrant=False)


def _resolve(model: nn.Module, plan: CheckpointPlan) -> list[nn.Module]:
    names = list(plan.units)
    if not names:
        raise FsdpkitError("the plan has no units; a model needs at least one unit to plan")
    modules = []
    for name in names:
        try:
            modules.append(model.get_submodule(name))
        except AttributeError:
            raise FsdpkitError(
                f"plan does not match the model: it has no unit {name!r} (re-plan for this model)"
            ) from None
    pos = 0
    for seg in plan.segments:
        s, e, _ = seg
        if s != pos or e <= s or e > len(names):
            raise FsdpkitError(f"plan segment {list(seg)} does not continue the chain at {pos}")
        pos = e
    if pos != len(names):
        raise FsdpkitError(f"plan segments cover {pos} of {len(names)} units")
    return modules


def apply_ac(model: nn.Module, plan: CheckpointPlan) -> int:
    """Checkpoint ``model`` in place as ``plan`` says; returns the number of regions.

    Raises :class:`FsdpkitError` when the plan names units the model does not have or its
    segments do not tile the chain. Undo with :func:`remove_ac`.
    """
    modules = _resolve(model, plan)
    regions = 0
    for s, e, ckpt in plan.segments:
        if not ckpt:
            continue
        forwards = [m.forward for m in modules[s:e]]
        modules[s].forward = partial(_run_segment, forwards)
        for m in modules[s + 1 : e]:
            m.forward = _identity
        regions += 1
    return regions


def remove_ac(model: nn.Module, plan: CheckpointPlan) -> None:
    """Undo :func:`apply_ac` (restores each unit's class ``forward``)."""
    for m in _resolve(model, plan):
        m.__dict__.pop("forward", None)
