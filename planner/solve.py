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

from .memory import (
    MemoryConfig,
    Segment,
    _Statics,
    estimate,
    normalize_segments,
    segment_events,
    static_floor_bytes,
    tail_events,
)
from .plan import Plan, make_plan
from .profile import ModelProfile

__all__ = [
    "OBJECTIVES",
    "minmax_partition",
    "plan_checkpoints",
    "solve_minmax",
    "solve_recompute",
    "sqrt_segments",
    "world_size_needed",
]

OBJECTIVES = ("recompute", "minmax")


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
    """The fewest recomputed FLOPs whose predicted peak is ≤ ``budget_bytes``; None if no
    segmentation fits."""
    n = len(prof.units)
    statics = _Statics(prof, cfg)
    if sum(statics.fwd(0).values()) + prof.pre_peak_bytes > budget_bytes:
        return None  # the work before unit 0 alone does not fit
    flops = [0, *accumulate(u.flops for u in prof.units)]
    # front[(pos, prev_type)] = list of (stored_bytes, recompute_flops, back-pointer)
    Entry = tuple[int, int, tuple | None]
    fronts: dict[tuple[int, bool | None], list[Entry]] = {
        (0, None): [(prof.pre_saved_bytes, 0, None)]
    }
    cache: dict[tuple[int, int, bool, bool | None], tuple[int, int]] = {}

    def cost(s: int, e: int, c: bool, prev: bool | None) -> tuple[int, int]:
        key = (s, e, c, prev)
        if key not in cache:
            stored, events = segment_events(prof, statics, s, e, c, prev)
            cache[key] = (sum(stored), max(ev.static_total + ev.local for ev in events))
        return cache[key]

    for s in range(n):
        for prev in (None, False, True):
            front = fronts.get((s, prev))
            if not front:
                continue
            # A plain segment longer than one unit equals a run of one-unit plain segments.
            moves = [(s + 1, False)] + [(e, True) for e in range(s + 1, n + 1)]
            for e, c in moves:
                stored, need = cost(s, e, c, prev)
                extra = flops[e] - flops[s] if c else 0
                for prefix, rec, bp in front:
                    if prefix + need > budget_bytes:
                        break  # fronts are sorted by stored bytes
                    fronts.setdefault((e, c), []).append(
                        (prefix + stored, rec + extra, ((s, e, c), bp))
                    )
            for key in {(s + 1, False), *((e, True) for e in range(s + 1, n + 1))}:
                if key in fronts:
                    fronts[key] = _pareto(fronts[key])
    best: tuple[int, tuple] | None = None
    for last in (False, True):
        for prefix, rec, bp in fronts.get((n, last), []):
            _, events = tail_events(prof, statics, last)
            if prefix + max(ev.static_total + ev.local for ev in events) > budget_bytes:
                continue
            if best is None or rec < best[0]:
                best = (rec, bp)
    if best is None:
        return None
    segments: list[Segment] = []
    bp = best[1]
    while bp is not None:
        segments.append(bp[0])
        bp = bp[1]
    return normalize_segments(segments[::-1], n)


def _pareto(entries: list) -> list:
    entries.sort(key=lambda x: (x[0], x[1]))
    out, best_rec = [], math.inf
    for entry in entries:
        if entry[1] < best_rec:
            out.append(entry)
            best_rec = entry[1]
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
    verify: Callable[[Sequence[Segment]], int] | None = None,
    max_rounds: int = 8,
) -> Plan:
    """Solve for a plan under ``budget_bytes`` per rank.

    The solver's programme leaves out one forward-only term (unit inputs the model's code holds,
    :func:`planner.memory.held_input_bytes`), so the chosen plan is replayed with
    :func:`~planner.memory.estimate`; ``verify(segments) -> peak bytes`` (e.g. a tracker run,
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
    floor = static_floor_bytes(prof, cfg)
    if floor > budget_bytes:
        raise FsdpkitError(_static_message(prof, cfg, floor, budget_bytes))
    t0 = time.perf_counter()
    largest = None
    if segments is not None or objective == "minmax":
        segs, largest = solve_minmax(prof, cfg, budget_bytes, segments)
        name = f"minmax (S={len(segs)})"
    else:
        segs = solve_recompute(prof, cfg, budget_bytes)
        name = "recompute"
        if segs is None:
            n = len(prof.units)
            segs = [(i, i + 1, True) for i in range(n - 1)] + [(n - 1, n, False)]
    target, rounds, verify_s, measured = budget_bytes, 0, 0.0, None
    while True:
        worst = estimate(prof, segs, cfg).peak_bytes
        measured = None
        if verify is not None and worst <= budget_bytes:
            t1 = time.perf_counter()
            measured = int(verify(segs))
            verify_s += time.perf_counter() - t1
            worst = max(worst, measured)
        if worst <= budget_bytes or name != "recompute" or rounds >= max_rounds:
            break
        target -= worst - budget_bytes  # tighten by the excess and solve again
        tighter = solve_recompute(prof, cfg, target)
        if tighter is None:
            break
        segs, rounds = tighter, rounds + 1
    notes = [f"re-planned {rounds} time(s) to fit the replay or the check"] if rounds else []
    return make_plan(
        prof, segs, cfg, budget_bytes=budget_bytes, objective=name,
        solver_time_s=time.perf_counter() - t0 - verify_s, max_segment_bytes=largest,
        verified_peak_bytes=measured, verify_time_s=verify_s, notes=notes,
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
