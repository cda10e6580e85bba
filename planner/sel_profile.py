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
from .devices import DEFAULT_GPU
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


# Variants each unit is offered beyond the base rule (see variant_thresholds); each costs one
# more profiling pass (all units at once).
SEL_VARIANTS = 2


def variant_thresholds(
    costs: OpCosts,
    i: int,
    saved: Mapping[int, int],
    ins: Mapping[int, int],
    outs: Mapping[int, int],
) -> list[float]:
    """Thresholds (:func:`kitcore.selective.keeps`) for unit ``i``'s variants (``saved``,
    ``ins``, ``outs``: the plain step's storages of the unit, key -> bytes).

    Keeping by score from the top, each distinct score is a level. Each level frees some
    bytes against keeping the unit plain and pays some recompute time (default device's
    roofline, whichever device a plan is later priced for; the solver prices the levels
    offered on that device).
    Levels that free nothing, keep what the base keeps, keep an output the code mutates in
    place (:meth:`OpCosts.unsafe`), or are dominated (another level, the base or checkpointing
    the unit frees as much for no more time) are dropped. Of the rest, the vertices of the
    lower convex hull of (freed, time) through plain (0, 0), the base and the checkpointed
    unit come first: across many units the solver mixes hull points, so those decide large
    models; more than :data:`SEL_VARIANTS` are thinned by dropping the vertex whose removal
    changes the hull least; fewer are topped up with the remaining levels farthest, in freed
    bytes, from those already offered (few units pick single points, not mixes)."""
    # bytes freed against keeping the unit plain, boundary tensors left out (a neighbour may
    # keep them anyway; the memory model counts each once), and time on the default device
    plain = total_bytes({k: v for k, v in saved.items() if k not in ins.keys() | outs.keys()})

    def option(t: float) -> tuple[int, float, float]:
        v = _selective_terms(saved, ins, outs, costs, i, t, None)
        return plain - v.saved_bytes, v.recompute_time_s[DEFAULT_GPU], t

    levels, seen = [], set()
    calls = costs.scores(i)
    for j, (score, _) in enumerate(calls):
        lower = calls[j + 1][0] if j + 1 < len(calls) else 0.0
        if lower >= score * (1 - 1e-6):
            continue  # the next call scores the same: no threshold separates them
        t = math.sqrt(score * lower) if lower > 0 else score / 2
        if t > 0 and t not in seen and not costs.unsafe(i, t) and not _same_as_base(costs, i, t):
            seen.add(t)
            levels.append(option(t))
    # checkpointing the unit (its own segment): frees every inner save, reruns the forward
    whole = costs.fwd_time[i][DEFAULT_GPU] - costs.after_time[i][DEFAULT_GPU]
    anchors = [option(0.0), (plain, whole, -1.0)]
    points = [p for p in levels if p[0] > 0 and not _dominated(p, [*levels, *anchors])]
    if not points:
        return []
    span = (max(p[0] for p in [*points, *anchors]) or 1, max(p[1] for p in [*points, *anchors]))
    norm = {p[2]: (p[0] / span[0], p[1] / (span[1] or 1.0)) for p in [*points, *anchors]}
    fixed = [(0.0, 0.0), *(norm[a[2]] for a in anchors)]  # plain, base, checkpointed
    hull = _lower_hull([*fixed, *(norm[p[2]] for p in points)])
    chosen = [p[2] for p in points if norm[p[2]] in hull]
    while len(chosen) > SEL_VARIANTS:
        chosen.remove(min(chosen, key=lambda t: _area(t, chosen, norm, fixed)))
    rest = [p[2] for p in points if p[2] not in chosen]
    while rest and len(chosen) < SEL_VARIANTS:
        marks = [x for x, _ in fixed] + [norm[t][0] for t in chosen]
        far = max(rest, key=lambda t: min(abs(norm[t][0] - x) for x in marks))
        chosen.append(far)
        rest.remove(far)
    return chosen


def _dominated(p: tuple, others: list[tuple]) -> bool:
    return any(q[0] >= p[0] and q[1] <= p[1] and (q[0], q[1]) != (p[0], p[1]) for q in others)


def _lower_hull(xy: list[tuple[float, float]]) -> set[tuple[float, float]]:
    """Vertices of the lower convex hull of points (x: bytes freed, y: time), by x."""
    hull: list[tuple[float, float]] = []
    for p in sorted(set(xy)):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                hull.pop()  # hull[-1] lies on or above the chord from hull[-2] to p
            else:
                break
        hull.append(p)
    return set(hull)


def _area(t: float, chosen: list[float], norm: dict, fixed: list[tuple]) -> float:
    """The triangle ``t``'s vertex forms with its neighbours on the polyline through the
    chosen levels and the fixed options (plain, base, checkpointed)."""
    line = sorted([*fixed, *(norm[c] for c in chosen)])
    k = line.index(norm[t])
    if k == 0 or k == len(line) - 1:
        return math.inf  # an end point: removing it shrinks the range offered
    (x1, y1), (x2, y2), (x3, y3) = line[k - 1], line[k], line[k + 1]
    return abs((x2 - x1) * (y3 - y1) - (x3 - x1) * (y2 - y1)) / 2


def _same_as_base(costs: OpCosts, i: int, t: float) -> bool:
    return all(c.kept_at(t) == c.base for c in costs.calls[i])
