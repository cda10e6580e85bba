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
    """A unit under op-level selective checkpointing that keeps only the kept operators of at
    least ``min_intensity`` FLOPs per byte of output (:func:`kitcore.selective.keeps`); the
    fields mean what :class:`UnitProfile`'s ``sel_*`` fields mean for the variant that keeps
    them all."""

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


# Variants per unit beyond keeping every kept operator, and the least share of the unit's
# kept bytes a variant must free beyond the previous one to be worth a profiling pass.
SEL_VARIANTS = 1
_MIN_STEP = 0.05


def variant_thresholds(costs: OpCosts, i: int) -> list[float]:
    """Thresholds for unit ``i``'s variants: each drops the kept calls of the next-lowest
    intensities (a widening 1x1 convolution before a 3x3 one), stopping at ``SEL_VARIANTS``
    and never dropping them all (that is a checkpointed unit, already a choice)."""
    calls = costs.intensities(i)
    total = sum(b for _, b in calls)
    out, dropped, last = [], 0, 0
    for j in range(len(calls) - 1):
        if len(out) >= SEL_VARIANTS:
            break
        dropped += calls[j][1]
        low, high = calls[j][0], calls[j + 1][0]
        if high <= low * (1 + 1e-6) or low <= 0:
            continue  # no threshold separates equal intensities
        if dropped - last >= _MIN_STEP * total:
            out.append(math.sqrt(low * high))  # between the two, far from either
            last = dropped
    return out
