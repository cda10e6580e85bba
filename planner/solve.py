"""Checkpoint solvers over a unit chain, both exact with respect to the memory model.

- ``minmax`` (the SEER paper, eq. 3): split per-unit activation bytes into S contiguous
  segments minimising the largest segment sum, checkpoint every segment but the last (as
  ``checkpoint_sequential`` does: the last one's activations are needed at once), and raise S
  until the predicted peak fits. Its objective is a proxy: it ignores boundary tensors, the
  backward working set and what recomputation costs.
- ``recompute`` (default): the least recomputed FLOPs whose predicted peak fits. A dynamic
  programme over (position, type of the previous segment) keeps the Pareto front of
  (activation bytes stored so far, FLOPs recomputed so far); every event's bytes are the stored
  prefix plus a segment-local term (:func:`planner.memory.segment_events`), so the front is
  exact. Cost: O(n²) segment evaluations of O(n) each.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from itertools import accumulate

from kitcore import FsdpkitError

from .devices import DEFAULT_GPU, get_device
from .memory import (
    MemoryConfig,
    Segment,
    _statics,
    estimate,
    normalize_segments,
    segment_events,
    static_floor_bytes,
    tail_events,
)
from .plan import Plan, make_plan
from .profile import ModelProfile, early_stop_savings, recompute_terms

__all__ = [
    "GRANULARITIES",
    "OBJECTIVES",
    "UnitCosts",
    "minmax_partition",
    "plan_checkpoints",
    "solve_minmax",
    "solve_recompute",
    "solve_selective",
    "sqrt_segments",
    "world_size_needed",
]

OBJECTIVES = ("recompute", "minmax")
GRANULARITIES = ("op", "unit")


def minmax_partition(m: Sequence[int], parts: int) -> tuple[list[tuple[int, int]], int]:
    """Exact contiguous partition of ``m`` into ``min(parts, len(m))`` non-empty ranges
    minimising the largest range sum. Returns ``([(start, end_exclusive), ...], largest)``.
    O(parts · n²) dynamic programme; ties go to the earliest split."""
    n = len(m)
    if n == 0 or parts < 1:
        raise ValueError("need at least one element and one part")
    parts = min(parts, n)
    pre = [0, *accumulate(m)]
    inf = math.inf
    # best[k][i]: smallest max-sum splitting m[:i] into k parts; cut[k][i]: start of last part
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], pre[i] - pre[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    ranges, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        ranges.append((j, i))
        i = j
    return ranges[::-1], int(best[parts][n])


def _sequential(ranges: list[tuple[int, int]]) -> list[Segment]:
    return [(s, e, k < len(ranges) - 1) for k, (s, e) in enumerate(ranges)]


def solve_minmax(
    prof: ModelProfile, cfg: MemoryConfig, budget_bytes: int, segments: int | None = None
) -> tuple[list[Segment], int]:
    """The paper's planner: fixed ``segments``, or the smallest S whose plan fits (else the
    lowest-peak S). Returns the segmentation and its largest segment's activation bytes."""
    m = [u.activation_bytes for u in prof.units]
    if segments is not None:
        if segments < 1:
            raise FsdpkitError(f"--segments must be >= 1, got {segments}")
        ranges, largest = minmax_partition(m, segments)
        return _sequential(ranges), largest
    best: tuple[int, list[Segment], int] | None = None
    for s in range(1, len(m) + 1):
        ranges, largest = minmax_partition(m, s)
        segs = _sequential(ranges)
        peak = estimate(prof, segs, cfg).peak_bytes
        if peak <= budget_bytes:
            return segs, largest
        if best is None or peak < best[0]:
            best = (peak, segs, largest)
    assert best is not None
    return best[1], best[2]


def solve_recompute(
    prof: ModelProfile, cfg: MemoryConfig, budget_bytes: int
) -> list[Segment] | None:
    """The fewest recomputed FLOPs whose predicted peak is ≤ ``budget_bytes`` over whole-unit
    segments; None if no segmentation fits."""
    found = _solve(prof, cfg, budget_bytes, UnitCosts.flops(prof), selective=False)
    return None if found is None else found[0]


def solve_selective(
    prof: ModelProfile,
    cfg: MemoryConfig,
    budget_bytes: int,
    costs: UnitCosts,
    *,
    selective: bool = True,
) -> tuple[list[Segment], list[tuple[int, float]]] | None:
    """The least recomputation cost (``costs``: seconds or FLOPs per unit) whose predicted peak
    is ≤ ``budget_bytes``, each unit kept, under op-level selective checkpointing (when
    ``selective`` and profiled; any of the unit's profiled thresholds) or inside a
    checkpointed segment. Returns ``(segments, selective units as (index, threshold)
    pairs)``; None if nothing fits."""
    return _solve(prof, cfg, budget_bytes, costs, selective=selective)


@dataclasses.dataclass(frozen=True, slots=True)
class UnitCosts:
    """What recomputing each unit costs: ``full[i]`` inside a checkpointed segment, ``sel[i]``
    under selective checkpointing keeping every kept operator (None: unavailable), in seconds
    or in FLOPs; ``variants[i]``: (threshold, cost) of its variants that keep fewer
    (:attr:`planner.profile.UnitProfile.selective_thresholds`). ``skip[i]``: the part of
    ``full[i]`` after the unit's last save for backward, which a segment ending with it never
    recomputes; ``saves[i]``: whether it saves anything
    (:func:`planner.profile.early_stop_savings`)."""

    full: tuple[float, ...]
    sel: tuple[float | None, ...]
    variants: tuple[tuple[tuple[float, float], ...], ...] = ()
    skip: tuple[float, ...] = ()
    saves: tuple[bool, ...] = ()

    def cheapest(self, i: int) -> float:
        """The least unit ``i`` costs inside any checkpointed segment (ending it)."""
        return self.full[i] - (self.skip[i] if self.skip else 0.0)

    def options(self, i: int) -> list[tuple[float, float]]:
        """Unit ``i``'s selective options: (threshold, cost), threshold 0.0 first."""
        if self.sel[i] is None:
            return []
        more = self.variants[i] if self.variants else ()
        return [(0.0, self.sel[i]), *more]

    @classmethod
    def flops(cls, prof: ModelProfile) -> UnitCosts:
        sel = tuple(u.sel_recompute_flops if u.has_selective else None for u in prof.units)
        variants = tuple(
            tuple((v.min_intensity, float(v.recompute_flops)) for v in u.sel_variants)
            for u in prof.units
        )
        full, skip, saves = recompute_terms(prof.units)
        return cls(tuple(map(float, full)), sel, variants, tuple(map(float, skip)), tuple(saves))

    @classmethod
    def roofline(cls, prof: ModelProfile, device: str) -> UnitCosts:
        """Roofline seconds on ``device``; FLOPs where the profile has no times (old JSON)."""
        if any(device not in u.fwd_time_s for u in prof.units):
            return cls.flops(prof)
        sel = tuple(u.sel_recompute_time_s[device] if u.has_selective else None for u in prof.units)
        variants = tuple(
            tuple((v.min_intensity, v.recompute_time_s[device]) for v in u.sel_variants)
            for u in prof.units
        )
        full, skip, saves = recompute_terms(prof.units, device)
        return cls(tuple(full), sel, variants, tuple(skip), tuple(saves))


# A unit's mode in the programme: None (no unit before), False (kept), True (checkpointed
# segment), or ("sel", threshold): plain, under op-level selective checkpointing.
SEL = "sel"


def _solve(
    prof: ModelProfile, cfg: MemoryConfig, budget_bytes: int, costs: UnitCosts, selective: bool
) -> tuple[list[Segment], list[tuple[int, float]]] | None:
    n = len(prof.units)
    statics = _statics(prof, cfg)
    if sum(statics.pre().values()) + prof.pre_peak_bytes > budget_bytes:
        return None  # the work before unit 0 alone does not fit
    base = list(prof.units)
    # per unit: {threshold: (view, cost)} of its selective options
    options = [
        {t: (base[i].selective(t), c) for t, c in costs.options(i)}
        if selective and base[i].has_selective
        else {}
        for i in range(n)
    ]
    full = [0.0, *accumulate(costs.full)]
    # front[(pos, prev_mode)] = list of (stored_bytes, cost, back-pointer)
    Entry = tuple[int, float, tuple | None]
    fronts: dict[tuple[int, object], list[Entry]] = {(0, None): [(prof.pre_saved_bytes, 0, None)]}
    cache: dict[tuple, tuple[int, int]] = {}

    def units_for(s: int, prev: object, sel: float | None) -> list:
        u = base
        if isinstance(prev, tuple) or sel is not None:
            u = list(base)
            if isinstance(prev, tuple):
                u[s - 1] = options[s - 1][prev[1]][0]
            if sel is not None:
                u[s] = options[s][sel][0]
        return u

    def seg_cost(s: int, e: int, c: bool, prev: object, sel: float | None) -> tuple[int, int]:
        key = (s, e, c, prev, sel)
        if key not in cache:
            before = False if isinstance(prev, tuple) else prev
            stored, events = segment_events(prof, statics, s, e, c, before, units_for(s, prev, sel))
            cache[key] = (sum(stored), max(ev.static_total + ev.local for ev in events))
        return cache[key]

    quantum = max(1, budget_bytes // _BUCKETS)

    def extend(front: list, s: int, e: int, c: bool, prev: object, sel: float | None) -> None:
        stored, need = seg_cost(s, e, c, prev, sel)
        if c:
            spared = early_stop_savings(costs.skip, costs.saves, s, e)
            extra, mode = full[e] - full[s] - spared, True
        elif sel is not None:
            extra, mode = options[s][sel][1], (SEL, sel)
        else:
            extra, mode = 0.0, False
        target = fronts.setdefault((e, mode), [])
        for prefix, rec, bp in front:
            if prefix + need > budget_bytes:
                break  # fronts are sorted by stored bytes
            target.append((prefix + stored, rec + extra, ((s, e, c, sel), bp)))

    def modes(s: int) -> list:
        return [None, False, True, *((SEL, t) for t in (options[s - 1] if s else ()))]

    for s in range(n):
        for prev in modes(s):
            if (s, prev) in fronts:
                fronts[(s, prev)] = _pareto(fronts[(s, prev)], quantum)
        merged: list = []
        for prev in modes(s):
            front = fronts.get((s, prev))
            if not front:
                continue
            merged += front
            # A plain segment longer than one unit equals a run of one-unit plain segments.
            extend(front, s, s + 1, False, prev, None)
            for t in options[s]:
                extend(front, s, s + 1, False, prev, t)
        # A checkpointed segment saves its input whatever came before: one pass for all modes.
        merged = _pareto(merged, quantum)
        for e in range(s + 1, n + 1):
            extend(merged, s, e, True, None, None)
    best: tuple[float, tuple] | None = None
    for last in modes(n)[1:]:
        entries = _pareto(fronts.get((n, last), []), quantum)
        if not entries:
            continue
        tail_units = units_for(n, last, None) if isinstance(last, tuple) else base
        _, events = tail_events(prof, statics, last is True, tail_units)
        need = max(ev.static_total + ev.local for ev in events)
        for prefix, rec, bp in entries:
            if prefix + need <= budget_bytes and (best is None or rec < best[0]):
                best = (rec, bp)
    if best is None:
        return None
    segments: list[Segment] = []
    chosen: list[tuple[int, float]] = []
    bp = best[1]
    while bp is not None:
        (s, e, c, sel), bp = bp
        segments.append((s, e, c))
        if sel is not None:
            chosen.append((s, sel))
    return normalize_segments(segments[::-1], n), sorted(chosen)


# Fronts keep at most two entries per 1/_BUCKETS of the budget (the least stored bytes, the
# least cost): bytes stay exact, the cost is optimal up to plans that differ by less than that.
_BUCKETS = 512


def _pareto(entries: list, quantum: int = 1) -> list:
    """Entries not dominated in (stored bytes, cost); per ``quantum`` of stored bytes the
    first (fewest bytes) and the cheapest."""
    entries.sort(key=lambda x: (x[0], x[1]))
    out, best_rec, bucket = [], math.inf, -1
    for entry in entries:
        if entry[1] < best_rec:
            b = entry[0] // quantum
            if b == bucket and len(out) >= 2 and out[-2][0] // quantum == b:
                out[-1] = entry  # the bucket's cheapest so far
            else:
                out.append(entry)
            bucket, best_rec = b, entry[1]
    return out


def sqrt_segments(n: int) -> list[Segment]:
    """Chen et al.'s √n heuristic: ⌈√n⌉ equal-length segments, all but the last checkpointed."""
    parts = max(1, round(math.sqrt(n)))
    bounds = [round(k * n / parts) for k in range(parts + 1)]
    return _sequential([(bounds[k], bounds[k + 1]) for k in range(parts)])


def plan_checkpoints(
    prof: ModelProfile,
    budget_bytes: int,
    cfg: MemoryConfig,
    *,
    objective: str = "recompute",
    segments: int | None = None,
    verify: Callable[..., int] | None = None,
    max_rounds: int = 8,
    granularity: str = "op",
    device: str = DEFAULT_GPU,
) -> Plan:
    """Solve for a plan under ``budget_bytes`` per rank.

    ``objective="recompute"`` minimises recomputation time: the roofline on ``device``
    (:mod:`planner.devices`; FLOPs for a profile without operator costs). ``granularity``:
    ``"op"`` chooses per unit among kept, op-level selective checkpointing and a checkpointed
    segment; ``"unit"`` only among whole-unit segments (the search before selective
    checkpointing, for comparison).

    The solver's programme leaves out one forward-only term (unit inputs the model's code holds,
    :func:`planner.memory.held_input_bytes`), so the chosen plan is replayed with
    :func:`~planner.memory.estimate`; ``verify(segments, selective) -> peak bytes`` (e.g. a
    tracker run,
    :func:`planner.oracle.tracker_verifier`) then checks it. While either exceeds the budget,
    the solver runs again with the budget lowered by the excess (at most ``max_rounds``
    times), so a plan reported as fitting fits both. ``Plan.verified_peak_bytes`` and
    ``verify_time_s`` record the last check.

    Raises :class:`FsdpkitError` when even the static memory (parameters, gradients,
    optimizer state: the optimizer step) exceeds the budget, since no plan can help then.
    With ``objective="recompute"`` and no feasible plan, returns the lowest-peak plan (every
    unit checkpointed, which the caller reports as not fitting).
    """
    if objective not in OBJECTIVES:
        raise FsdpkitError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    if granularity not in GRANULARITIES:
        raise FsdpkitError(
            f"unknown granularity {granularity!r}; choose from {', '.join(GRANULARITIES)}"
        )
    get_device(device)
    costs = UnitCosts.roofline(prof, device)
    floor = static_floor_bytes(prof, cfg)
    if floor > budget_bytes:
        raise FsdpkitError(_static_message(prof, cfg, floor, budget_bytes))
    t0 = time.perf_counter()
    largest, sel = None, []
    op_level = granularity == "op"

    def solve(budget: int):
        return solve_selective(prof, cfg, budget, costs, selective=op_level)

    if segments is not None or objective == "minmax":
        segs, largest = solve_minmax(prof, cfg, budget_bytes, segments)
        name = f"minmax (S={len(segs)})"
    else:
        found = solve(budget_bytes)
        name = "recompute"
        if found is None:
            n = len(prof.units)
            segs = [(i, i + 1, True) for i in range(n - 1)] + [(n - 1, n, False)]
        else:
            segs, sel = found
    target, rounds, verify_s, measured = budget_bytes, 0, 0.0, None
    while True:
        worst = estimate(prof, segs, cfg, sel).peak_bytes
        measured = None
        if verify is not None and worst <= budget_bytes:
            t1 = time.perf_counter()
            measured = int(verify(segs, sel))
            verify_s += time.perf_counter() - t1
            worst = max(worst, measured)
        if worst <= budget_bytes or name != "recompute" or rounds >= max_rounds:
            break
        target -= worst - budget_bytes  # tighten by the excess and solve again
        tighter = solve(target)
        if tighter is None:
            break
        (segs, sel), rounds = tighter, rounds + 1
    notes = [f"re-planned {rounds} time(s) to fit the replay or the check"] if rounds else []
    return make_plan(
        prof, segs, cfg, budget_bytes=budget_bytes, objective=name,
        solver_time_s=time.perf_counter() - t0 - verify_s, max_segment_bytes=largest,
        verified_peak_bytes=measured, verify_time_s=verify_s, notes=notes, selective=sel,
        device=device,
    )  # fmt: skip


GIB = 2**30


def world_size_needed(prof: ModelProfile, cfg: MemoryConfig, budget_bytes: int) -> int | None:
    """Smallest world size at which some plan fits ``budget_bytes`` (sharded configs): the
    static terms shrink with the world, activations do not. None when no world size helps."""

    def fits(world: int) -> bool:
        c = dataclasses.replace(cfg, world_size=world)
        return (
            static_floor_bytes(prof, c) <= budget_bytes
            and solve_recompute(prof, c, budget_bytes) is not None
        )

    hi = max(cfg.world_size, 1)
    while not fits(hi):
        if hi >= 1 << 16:
            return None
        hi *= 2
    lo = hi // 2
    while lo + 1 < hi:  # memory falls as the world grows: bisect the last doubling
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def _static_message(prof: ModelProfile, cfg: MemoryConfig, floor: int, budget: int) -> str:
    msg = (
        f"parameters + gradients + optimizer state alone need {floor / GIB:.2f} GiB per rank "
        f"at world size {cfg.world_size}; budget {budget / GIB:.2f} GiB; "
    )
    if not cfg.sharded:
        return msg + "shard the model (FSDP) or use a larger device"
    need = world_size_needed(prof, cfg, budget)
    if need is None:
        fixed = prof.input_bytes + prof.buffer_bytes + cfg.overhead_bytes
        return msg + (
            f"no world size helps: activations, inputs, buffers and the fixed overhead "
            f"({fixed / GIB:.2f} GiB) do not shrink with it; lower --overhead or the batch"
        )
    return msg + f"world size >= {need} needed"
