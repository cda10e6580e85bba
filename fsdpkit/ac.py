"""Activation checkpointing driven by a plan: each checkpointed segment of units becomes one
checkpointed region, and every unit is still called by the model as before.

A plan names the model's units (``plan.units``, qualified module names in order) and splits
them into ``plan.segments`` of ``(start, end_exclusive, checkpointed)``. Units form a chain
(each unit's output is the next unit's input). For a checkpointed segment ``[s, e)``, a forward
pre-hook on unit ``s`` enters non-reentrant checkpointing and a forward hook on unit ``e - 1``
leaves it: only the segment's input is kept; in backward, units ``s..e-1`` run again through
their own ``__call__``, so hooks on them (FSDP2's un-shard, our profilers) see the
recomputation as they see the forward. Memory: one segment's activations at a time; compute:
one more forward of every checkpointed unit.

Recomputation leaves BatchNorm running statistics alone (momentum 0 and the batch counter
restored while it runs): plain ``torch.utils.checkpoint`` updates them twice per step.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import nullcontext, suppress
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import _checkpoint_without_reentrant_generator

from .errors import FsdpkitError

__all__ = ["CheckpointPlan", "apply_ac", "remove_ac"]

_HANDLES = "_fsdpkit_ac_handles"
# torch >= 2.7 added ``early_stop`` before *args; pass it only where it exists.
_HAS_EARLY_STOP = (
    "early_stop" in inspect.signature(_checkpoint_without_reentrant_generator).parameters
)


class CheckpointPlan(Protocol):
    """What :func:`apply_ac` reads from a plan (``planner.Plan`` satisfies it)."""

    units: Sequence[str]
    segments: Sequence[tuple[int, int, bool]]


def _contexts():
    return nullcontext(), nullcontext()


class _Segment:
    """Checkpointing of units[0..] entered at the first unit's call, left after the last's."""

    def __init__(self, units: list[nn.Module]) -> None:
        self.units = units
        self.gen = None
        self.recomputing = False
        self.bns = [m for u in units for m in u.modules() if isinstance(m, _BatchNorm)]

    def recompute(self, *args: Any) -> Any:
        frozen = [(m, m.momentum, m.num_batches_tracked) for m in self.bns if m.training]
        self.recomputing = True
        counters = [n.clone() if n is not None else None for _, _, n in frozen]
        for m, _, _ in frozen:
            m.momentum = 0.0  # running stats were updated by the forward already
        try:
            x = self.units[0](*args)
            for unit in self.units[1:]:
                x = unit(x)
            return x
        finally:
            self.recomputing = False
            for (m, momentum, n), saved in zip(frozen, counters, strict=True):
                m.momentum = momentum
                if n is not None:
                    n.copy_(saved)

    def enter(self, _module: nn.Module, args: tuple) -> None:
        if self.recomputing or not torch.is_grad_enabled():
            return
        head = (self.recompute, True, _contexts, "default", False)
        self.gen = _checkpoint_without_reentrant_generator(
            *head, *((True,) if _HAS_EARLY_STOP else ()), *args
        )
        next(self.gen)

    def leave(self, _module: nn.Module, _args: tuple, _out: Any) -> None:
        if self.recomputing or self.gen is None:
            return
        gen, self.gen = self.gen, None
        with suppress(StopIteration):
            next(gen)


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

    Apply before sharding (``fully_shard``) so that checkpointing sits inside each sharded
    unit. Raises :class:`FsdpkitError` when the plan names units the model does not have, its
    segments do not tile the chain, or the model is already checkpointed.
    """
    if getattr(model, _HANDLES, None):
        raise FsdpkitError("the model is already checkpointed; call remove_ac first")
    modules = _resolve(model, plan)
    handles = []
    for s, e, ckpt in plan.segments:
        if not ckpt:
            continue
        seg = _Segment(modules[s:e])
        handles.append(modules[s].register_forward_pre_hook(seg.enter))
        handles.append(modules[e - 1].register_forward_hook(seg.leave, always_call=True))
    object.__setattr__(model, _HANDLES, handles)
    return len(handles) // 2


def remove_ac(model: nn.Module) -> None:
    """Undo :func:`apply_ac`."""
    for h in getattr(model, _HANDLES, None) or []:
        h.remove()
    object.__setattr__(model, _HANDLES, [])
