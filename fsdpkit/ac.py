"""Activation checkpointing driven by a plan: each checkpointed segment of units becomes one
checkpointed region, and every unit is still called by the model as before.

A plan names the model's units (``plan.units``, qualified module names in order) and splits
them into ``plan.segments`` of ``(start, end_exclusive, checkpointed)``. Units form a chain:
each unit's input comes from the previous unit's output (the tensor itself, an element of a
tuple or a view of it, e.g. ``layer(x)[0]``), plus arguments that do not (``input_dimensions``
of a Swin block, a mask). For a checkpointed segment ``[s, e)``, a forward pre-hook on unit
``s`` enters non-reentrant checkpointing and a forward hook on unit ``e - 1`` leaves it: only
the segment's input is kept. While the region runs, the hooks record how each unit was called
(which output element or view it received; other arguments as they were); in backward, units
``s..e-1`` run again through their own ``__call__`` with those arguments, so hooks on them
(FSDP2's un-shard, our profilers) see the recomputation as they see the forward. Memory: one
segment's activations at a time; compute: one more forward of every checkpointed unit.

What the model's own code holds is not released by checkpointing: a ``forward`` that runs
``x = self.trunk(x)`` keeps the trunk's input until the trunk returns, whether or not anything
saves it for backward. The planner measures and models that (``UnitProfile.input_held_until``).

Recomputation leaves BatchNorm running statistics alone (momentum 0 and the batch counter
restored while it runs): plain ``torch.utils.checkpoint`` updates them twice per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_leaves, tree_map

from kitcore.errors import FsdpkitError
from kitcore.selective import is_candidate, keeps, kept_ops

from ._torch_private import check_checkpoint_region, checkpoint_region

__all__ = ["CheckpointPlan", "apply_ac", "remove_ac", "selective_context_fn"]

_HANDLES = "_fsdpkit_ac_handles"


class CheckpointPlan(Protocol):
    """What :func:`apply_ac` reads from a plan (``planner.Plan`` satisfies it); an optional
    ``selective`` (unit indices) is read too, and with it an optional
    ``selective_min_intensity`` (per selective unit, in the same order: 0 = keep the kept
    operators, above 0 a score threshold in FLOPs per byte; see :func:`selective_context_fn`)."""

    units: Sequence[str]
    segments: Sequence[tuple[int, int, bool]]


def selective_context_fn(min_intensity: float = 0.0) -> Any:
    """``context_fn`` for ``torch.utils.checkpoint``: keep the outputs of the operators of
    :func:`kitcore.selective.kept_ops` (convolutions, matrix products, attention), recompute
    the rest in backward. With ``min_intensity`` > 0 (FLOPs per byte), keep instead every
    operator whose recompute time per byte kept scores at least that
    (:func:`kitcore.selective.keeps`): a low threshold keeps residual adds and normalisations
    too, a high one only the most intense convolutions."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    # A kept output may be mutated in place by an idempotent op (kitcore.selective); the
    # planner offers selective checkpointing only to units whose code does nothing else.
    rule = list(kept_ops()) if min_intensity <= 0 else _intensity_policy(min_intensity)
    return partial(create_selective_checkpoint_contexts, rule, allow_cache_entry_mutation=True)


def _intensity_policy(min_intensity: float) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if not is_candidate(func):
            return CheckpointPolicy.PREFER_RECOMPUTE
        out = getattr(ctx, "op_output", None)
        if out is None:  # torch releases that ask before the operator runs
            out = _meta_output(func, args, kwargs)
        if keeps(func, args, kwargs, out, min_intensity):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _meta_output(func: Any, args: tuple, kwargs: dict) -> Any:
    """``func``'s output on meta tensors of its arguments' shapes (no data, no other modes)."""
    from torch.utils._python_dispatch import _disable_current_modes

    def meta(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
        return v

    with _disable_current_modes():
        return func(*tree_map(meta, args), **tree_map(meta, kwargs))


@dataclass(frozen=True, slots=True)
class _FromPrevious:
    """Argument = leaf ``index`` of the previous unit's output, or a view of it
    (``view`` = size, stride, storage offset)."""

    index: int
    view: tuple[tuple[int, ...], tuple[int, ...], int] | None = None


def _tensor_leaves(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


class _Segment:
    """Checkpointing of units[0..] entered at the first unit's call, left after the last's."""

    def __init__(self, units: list[nn.Module], context_fn: Any = None) -> None:
        self.units = units
        self.context_fn = context_fn
        self.gen = None
        self.recomputing = False
        self.bns = [m for u in units for m in u.modules() if isinstance(m, _BatchNorm)]
        self.calls: list[tuple[tuple, dict]] = []  # how units[1:] were called, this forward
        self._outputs: list[tuple[int, int]] = []  # (id, storage key) of the last output leaves

    def recompute(self, calls: list[tuple[tuple, dict]], *args: Any, **kwargs: Any) -> Any:
        # Running statistics were updated by the forward already: momentum 0, and the batch
        # counter taken away so nothing increments it. No tensor op here: under selective
        # checkpointing this runs inside its dispatch mode, which must see the forward's ops.
        frozen = [(m, m.momentum, m.num_batches_tracked) for m in self.bns if m.training]
        self.recomputing = True
        for m, _, _ in frozen:
            m.momentum = 0.0
            m.num_batches_tracked = None
        try:
            if self.context_fn is not None:
                # Selective: torch checks that recomputation runs the forward's operators, and
                # the unit's own hooks ran outside the region in forward (FSDP2's input cast
                # and un-shard; in backward its parameters are gathered already).
                return self.units[0].forward(*args, **kwargs)
            x = self.units[0](*args, **kwargs)
            for unit, call in zip(self.units[1:], calls, strict=True):
                leaves = _tensor_leaves(x)
                a, kw = tree_map(lambda v, lv=leaves: _rebuild(v, lv), call)
                x = unit(*a, **kw)
            return x
        finally:
            self.recomputing = False
            for m, momentum, counter in frozen:
                m.momentum = momentum
                m.num_batches_tracked = counter

    def _active(self) -> bool:
        return self.gen is not None and not self.recomputing

    def enter(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.recomputing or not torch.is_grad_enabled():
            return
        self.calls = []  # one list per forward: gradient accumulation runs several
        # What torch.utils.checkpoint.checkpoint(use_reentrant=False) does around one call,
        # here around the units' calls by the model (why no public API: _torch_private).
        self.gen = checkpoint_region(
            partial(self.recompute, self.calls), *args, context_fn=self.context_fn, **kwargs
        )
        next(self.gen)

    def record_output(self, _module: nn.Module, _args: tuple, out: Any) -> None:
        if self._active():
            leaves = _tensor_leaves(out)
            self._outputs = [(id(t), storage_key(t)) for t in leaves]

    def record_call(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._active():
            return
        ids = {i: k for k, (i, _) in enumerate(self._outputs)}
        keys = {st: k for k, (_, st) in enumerate(self._outputs)}

        def describe(v: Any) -> Any:
            if not isinstance(v, torch.Tensor):
                return v
            if id(v) in ids:
                return _FromPrevious(ids[id(v)])
            if storage_key(v) in keys:
                return _FromPrevious(
                    keys[storage_key(v)], (tuple(v.shape), v.stride(), v.storage_offset())
                )
            return v  # not computed by the previous unit: kept as it is for recomputation

        self.calls.append(tree_map(describe, (args, kwargs)))
        self._outputs = []

    def leave(self, _module: nn.Module, _args: tuple, _out: Any) -> None:
        if self.recomputing or self.gen is None:
            return
        gen, self.gen = self.gen, None
        self._outputs = []
        with suppress(StopIteration):
            next(gen)


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _rebuild(v: Any, leaves: list[torch.Tensor]) -> Any:
    if not isinstance(v, _FromPrevious):
        return v
    t = leaves[v.index]
    return t if v.view is None else t.as_strided(*v.view)


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


def _selective_units(plan: CheckpointPlan) -> list[int]:
    selective = [int(i) for i in getattr(plan, "selective", ()) or ()]
    plain = {i for s, e, c in plan.segments if not c for i in range(s, e)}
    for i in selective:
        if i not in plain:
            raise FsdpkitError(
                f"plan unit {i} is selective but not in a plain segment (re-plan for this model)"
            )
    return sorted(set(selective))


def apply_ac(model: nn.Module, plan: CheckpointPlan) -> int:
    """Checkpoint ``model`` in place as ``plan`` says; returns the number of regions.

    Units in ``plan.selective`` run under op-level selective checkpointing (one region each):
    the outputs of their convolutions, matrix products and attention are kept for backward,
    the rest recomputed there, still inside the unit (under FSDP2, with its parameters
    already gathered for its backward: no extra all-gather).

    Apply before sharding (``fully_shard``) so that checkpointing sits inside each sharded
    unit. Raises :class:`FsdpkitError` when the plan names units the model does not have, its
    segments do not tile the chain, or the model is already checkpointed.
    """
    if getattr(model, _HANDLES, None):
        raise FsdpkitError("the model is already checkpointed; call remove_ac first")
    modules = _resolve(model, plan)
    selective = _selective_units(plan)
    if selective or any(ckpt for _, _, ckpt in plan.segments):
        check_checkpoint_region()  # fail here, not in the first forward, if torch changed it
    handles = []
    regions = 0
    # a unit's threshold (FLOPs per byte) when the plan keeps fewer than all kept operators
    order = [int(i) for i in getattr(plan, "selective", ()) or ()]
    given = [float(t) for t in getattr(plan, "selective_min_intensity", None) or ()]
    if given and len(given) != len(order):
        raise FsdpkitError(
            f"plan has {len(given)} selective thresholds for {len(order)} selective units "
            "(re-plan for this model)"
        )
    thresholds = dict(zip(order, given, strict=False))  # no thresholds: all 0
    contexts = {t: selective_context_fn(t) for t in {thresholds.get(i, 0.0) for i in selective}}
    spans = [(s, e, None) for s, e, ckpt in plan.segments if ckpt]
    spans += [(i, i + 1, contexts[thresholds.get(i, 0.0)]) for i in selective]
    for s, e, context_fn in sorted(spans, key=lambda span: span[0]):
        seg = _Segment(modules[s:e], context_fn)
        handles.append(modules[s].register_forward_pre_hook(seg.enter, with_kwargs=True))
        for m in modules[s + 1 : e]:
            handles.append(m.register_forward_pre_hook(seg.record_call, with_kwargs=True))
        for m in modules[s : e - 1]:
            handles.append(m.register_forward_hook(seg.record_output))
        handles.append(modules[e - 1].register_forward_hook(seg.leave, always_call=True))
        regions += 1
    object.__setattr__(model, _HANDLES, handles)
    return regions


def remove_ac(model: nn.Module) -> None:
    """Undo :func:`apply_ac`."""
    for h in getattr(model, _HANDLES, None) or []:
        h.remove()
    object.__setattr__(model, _HANDLES, [])
