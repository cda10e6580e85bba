"""How little any plan can recompute: a lower bound that tells how far from optimal a plan is.

Every plan the solvers consider keeps each unit, runs it under op-level selective
checkpointing, or recomputes it inside a checkpointed segment. Take the plain step's peak
event E (e.g. ``bwd 27``). Under any plan, the memory at E is at least the plain step's less
what the units still holding activations at E stop keeping: recomputation only adds (a
recomputed segment, parameters kept gathered, a selective unit's larger backward). So a plan
that fits a budget frees at least ``plain peak - budget`` bytes among those units, and what it
pays is at least the cheapest way to free that many bytes with each unit's options taken
fractionally: the linear relaxation of a multiple-choice knapsack, solved exactly by taking
each unit's convex hull of (cost, bytes freed) increments in order of bytes per unit of cost.
At a unit's own forward, checkpointing it also frees the difference between its forward's
working set with and without grad. Freed bytes are over-estimated on purpose (a checkpointed
unit is credited with both boundary tensors beside it, even where a neighbour keeps them),
which keeps the bound a bound.

On ``regnet10b`` (batch 16, 8 ranks, fp16, 40 GiB) this shows whether a plan's recomputation
can still be halved by a better search, or only by cheaper ways to free bytes.
"""

from __future__ import annotations

from itertools import pairwise

from .memory import MemoryConfig, estimate
from .profile import ModelProfile
from .solve import UnitCosts

__all__ = ["recompute_lower_bound"]


def _alive(label: str, n: int) -> range | None:
    """Units whose activations the plain step holds at event ``label``; None where no plan
    changes anything (before unit 0, after the last reduce, the optimizer step)."""
    kind, _, where = label.partition(" ")
    if where == "tail" and kind in ("fwd", "bwd"):
        return range(n)
    if not where.isdigit():
        return None
    k = int(where)
    return range(k + 1) if kind == "bwd" else range(k)  # gather/fwd/reduce: before k


def _hull(points: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """Increments ``(cost, bytes)`` along the upper concave hull of ``(0, 0)`` and each option
    ``(cost, bytes freed)``, in order of decreasing bytes per cost."""
    pts = sorted({(c, b) for c, b in points if b > 0}, key=lambda p: (p[0], -p[1]))
    hull: list[tuple[float, int]] = [(0.0, 0)]
    for c, b in pts:
        if b <= hull[-1][1]:
            continue  # costs at least as much and frees no more
        while len(hull) >= 2:
            (c0, b0), (c1, b1) = hull[-2], hull[-1]
            # drop the middle point when it lies on or under the segment to (c, b)
            if (b1 - b0) * (c - c0) <= (b - b0) * (c1 - c0):
                hull.pop()
            else:
                break
        hull.append((c, b))
    return [(c1 - c0, b1 - b0) for (c0, b0), (c1, b1) in pairwise(hull)]


def recompute_lower_bound(
    prof: ModelProfile,
    budget_bytes: int,
    cfg: MemoryConfig,
    costs: UnitCosts,
    *,
    selective: bool = True,
) -> float | None:
    """Least recomputation cost (``costs``' unit: seconds or FLOPs) that any plan whose
    predicted peak fits ``budget_bytes`` must pay (see the module docstring); 0.0 when the
    plain step fits; None when no plan of these choices can fit. ``selective=False``: plans
    of whole-unit segments only (``--granularity unit``)."""
    n = len(prof.units)
    plain = estimate(prof, [(0, n, False)], cfg)
    need = plain.peak_bytes - budget_bytes
    if need <= 0:
        return 0.0
    alive = _alive(plain.peak_event, n)
    if alive is None:
        return None
    steps: list[tuple[float, int]] = []
    kind, _, where = plain.peak_event.partition(" ")
    if kind == "fwd" and where.isdigit():  # a checkpointed unit runs forward without grad
        u = prof.units[int(where)]
        steps += _hull([(costs.cheapest(int(where)), u.fwd_peak_bytes - u.fwd_nograd_peak_bytes)])
    units = prof.units
    # plain boundary k (between units k-1 and k) keeps the larger of the two units' saves
    edge = [max(units[k - 1].saves_output_bytes if k else 0, units[k].saves_input_bytes)
            for k in range(n)]  # fmt: skip
    edge.append(max(units[-1].saves_output_bytes, prof.tail_saves_input_bytes))
    for i in alive:
        u = units[i]
        options = [(costs.cheapest(i), u.saved_bytes + edge[i] + edge[i + 1])]
        if selective and u.has_selective:
            # keeps its whole input: only its saves and its output side can shrink
            for t, cost in costs.options(i):
                kept = u.sel_terms(t).saved_bytes
                options.append((cost, u.saved_bytes - kept + edge[i + 1]))
        steps += _hull(options)
    steps.sort(key=lambda s: -s[1] / s[0] if s[0] > 0 else -float("inf"))
    paid = 0.0
    for cost, freed in steps:
        if freed >= need:
            return paid + cost * need / freed
        paid += cost
        need -= freed
    return None
