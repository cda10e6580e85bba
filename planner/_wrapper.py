"""The one place the planner reaches the FSDP wrapper: to *measure* a plan, a step must run
with it applied. Imports are lazy, so ``import planner`` loads no FSDP; planning never gets
here (only :mod:`planner.measure`, :mod:`planner.oracle`, and the profile's pass that runs
units under op-level selective checkpointing do)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from kitcore import FSDPPolicy, ModelSpec

__all__ = [
    "SelectiveSpec",
    "apply_checkpointing",
    "remove_checkpointing",
    "selective_items",
    "shard_like_training",
]

# Units under op-level selective checkpointing: indices (keeping every kept operator) or
# (index, score threshold in FLOPs per byte; 0 = the kept operators) pairs
# (kitcore.selective.keeps).
SelectiveSpec = Sequence[int | tuple[int, float]]


def selective_items(selective: SelectiveSpec) -> list[tuple[int, float]]:
    """``selective`` as (unit index, threshold) pairs, 0.0 where only an index is given."""
    out = []
    for item in selective:
        i, t = (item, 0.0) if isinstance(item, int) or not isinstance(item, Sequence) else item
        out.append((int(i), float(t)))
    return out


@dataclass(frozen=True, slots=True)
class _Chain:
    """What ``fsdpkit.apply_ac`` and ``fsdpkit.parallelize`` read from a plan."""

    units: tuple[str, ...]
    segments: tuple[tuple[int, int, bool], ...]
    selective: tuple[int, ...] = ()
    selective_min_intensity: tuple[float, ...] = ()


def _chain(
    spec: ModelSpec, model: nn.Module, segments: Sequence[Sequence], selective: SelectiveSpec
) -> _Chain:
    names = tuple(n for n, _ in spec.named_units(model))
    segs = tuple((int(s), int(e), bool(c)) for s, e, c in segments)
    items = selective_items(selective)
    return _Chain(names, segs, tuple(i for i, _ in items), tuple(t for _, t in items))


def apply_checkpointing(
    spec: ModelSpec, model: nn.Module, segments: Sequence[Sequence], selective: SelectiveSpec = ()
) -> None:
    """Checkpoint ``segments`` of ``model``'s unit chain, and run ``selective`` units (indices
    or (index, threshold) pairs) under op-level selective checkpointing, as training does
    (``fsdpkit.apply_ac``)."""
    from fsdpkit import apply_ac

    apply_ac(model, _chain(spec, model, segments, selective))


def remove_checkpointing(model: nn.Module) -> None:
    """Undo :func:`apply_checkpointing`."""
    from fsdpkit import remove_ac

    remove_ac(model)


def shard_like_training(
    spec: ModelSpec,
    model: nn.Module,
    segments: Sequence[Sequence],
    mesh,
    policy: FSDPPolicy,
    selective: SelectiveSpec = (),
) -> None:
    """Checkpoint and shard ``model`` as training does (``fsdpkit.parallelize``)."""
    from fsdpkit import parallelize

    plan = _chain(spec, model, segments, selective)
    parallelize(model, plan=plan, mesh=mesh, policy=policy)
