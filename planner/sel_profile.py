"""Per-unit terms of op-level selective checkpointing, for :mod:`planner.profile`: what a unit
keeps and recomputes at each threshold (from :class:`~planner.opcost.OpCosts` of the plain
step), which thresholds it is offered, and its backward peak under each, measured by running
the step with the units selective as training applies it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from kitcore import ModelSpec

from ._wrapper import apply_checkpointing, remove_checkpointing
from .opcost import OpCosts
from .trace import Trace, total_bytes
from .tracker import LiveMemory

__all__ = [
    "SEL_VARIANTS",
    "SelVariant",
    "selective_bwd_peaks",
    "selective_fields",
    "variant_thresholds",
]


@dataclass(frozen=True, slots=True)
class SelVariant:
    """A unit under op-level selective checkpointing that keeps the outputs of every operator
    scoring at least ``min_intensity`` (recompute time per byte kept, in FLOPs per byte:
    :func:`kitcore.selective.keeps`); the fields mean what :class:`UnitProfile`'s ``sel_*``
    fields mean for the base rule (every kept operator, nothing else)."""

    min_intensity: float
    saved_bytes: int
    saves_output_bytes: int
    recomputed_bytes: int
    recompute_flops: int
    recompute_time_s: Mapping[str, float]
    bwd_peak_bytes: int | None = None


def selective_bwd_peaks(
    spec: ModelSpec,
    model: nn.Module,
    inputs: Any,
    static: list,
    excluded: set[int],
    sel: Mapping[int, float],
) -> list[int]:
    """Per unit, the backward's peak (bytes above its start) with units ``sel`` (index ->
    threshold, FLOPs per output byte) under op-level selective checkpointing as training
    applies it (:func:`fsdpkit.apply_ac`): torch recomputes at the first use of a value not
    kept, so what is alive at once depends on the unit's backward order, which only running
    it shows."""
    n = len(spec.named_units(model))
    trace = Trace(LiveMemory(), n, excluded)
    if not sel:
        return trace.bwd_peak
    trace.t.register(static)
    apply_checkpointing(spec, model, [(0, n, False)], list(sel.items()))
    try:
        trace.run(spec, model, spec.named_units(model), inputs, grad=True)
    finally:
        remove_checkpointing(model)
        model.zero_grad(set_to_none=True)
    return trace.bwd_peak


def _selective_terms(
    saved: dict[int, int],
    ins: dict[int, int],
    outs: dict[int, int],
    costs: OpCosts,
    i: int,
    min_intensity: float,
    bwd_peak: int | None,
) -> SelVariant:
    """Unit ``i`` under op-level selective checkpointing at ``min_intensity`` (see
    :meth:`UnitProfile.selective`): kept operators' outputs held to backward, and what its
    backward recomputes (plain saves not kept, its own output among them)."""
    kept, dead, flops, seconds = costs.threshold(i, min_intensity)
    boundary = ins.keys() | outs.keys()
    return SelVariant(
        min_intensity=min_intensity,
        saved_bytes=total_bytes({k: v for k, v in kept.items() if k not in boundary}) + dead,
        saves_output_bytes=total_bytes(kept, outs.keys() - ins.keys()),
        recomputed_bytes=total_bytes(
            {k: v for k, v in saved.items() if k not in kept and k not in ins}
        ),
        recompute_flops=flops,
        recompute_time_s=seconds,
        bwd_peak_bytes=bwd_peak,
    )


def selective_fields(saved, ins, outs, costs, i, thresholds, sel_bwd) -> dict[str, Any]:
    """UnitProfile's ``sel_*`` fields for unit ``i``: none if it is not eligible."""
    if thresholds is None:
        return {}
    base, *more = (
        _selective_terms(saved, ins, outs, costs, i, t, sel_bwd[k][i])
        for k, t in enumerate([0.0, *thresholds])
    )
    return {
        "sel_saved_bytes": base.saved_bytes,
        "sel_saves_output_bytes": base.saves_output_bytes,
        "sel_recomputed_bytes": base.recomputed_bytes,
        "sel_recompute_flops": base.recompute_flops,
        "sel_bwd_peak_bytes": base.bwd_peak_bytes,
        "sel_recompute_time_s": base.recompute_time_s,
        "sel_variants": tuple(more),
    }


# The variants each unit is offered beyond keeping every kept operator: for each share, the
# threshold whose kept bytes come closest to that share of the base's (see variant_thresholds).
# Each costs one more profiling pass (all units at once).
SEL_TARGETS = (0.5, 1.0, 1.5)
SEL_VARIANTS = len(SEL_TARGETS)


def variant_thresholds(costs: OpCosts, i: int) -> list[float]:
    """Thresholds (:func:`kitcore.selective.keeps`) for unit ``i``'s variants. Keeping by
    score from the top, each distinct score is a level with its kept bytes; for each share in
    ``SEL_TARGETS`` the level closest to that share of what the base keeps (every kept
    operator) is offered, unless it keeps nothing, keeps what the base keeps, or keeps an
    output the unit's code mutates in place (:meth:`OpCosts.unsafe`)."""
    calls = costs.scores(i)
    base = costs.threshold(i, 0.0)
    base_bytes = sum(base[0].values()) + base[1]
    levels, kept = [], 0
    for j, (score, b) in enumerate(calls):
        kept += b
        lower = calls[j + 1][0] if j + 1 < len(calls) else 0.0
        if lower >= score * (1 - 1e-6):
            continue  # the next call scores the same: no threshold separates them
        t = math.sqrt(score * lower) if lower > 0 else score / 2
        if t > 0:
            levels.append((t, kept))
    out = []
    for share in SEL_TARGETS:
        fits = [
            (abs(b - share * base_bytes), t)
            for t, b in levels
            if t not in out and not costs.unsafe(i, t) and not _same_as_base(costs, i, t)
        ]
        if fits and base_bytes > 0:
            out.append(min(fits)[1])
    return out


def _same_as_base(costs: OpCosts, i: int, t: float) -> bool:
    return all(c.kept_at(t) == c.base for c in costs.calls[i])
