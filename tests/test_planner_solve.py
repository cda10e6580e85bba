"""Solvers: exact against brute force (hypothesis), and every returned plan fits."""

import dataclasses
import itertools
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fsdpkit import FsdpkitError
from planner import (
    MemoryConfig,
    ModelProfile,
    SelVariant,
    UnitCosts,
    UnitProfile,
    estimate,
    minmax_partition,
    plan_checkpoints,
    recompute_lower_bound,
    solve_minmax,
    solve_recompute,
    solve_selective,
    sqrt_segments,
    static_floor_bytes,
)


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=8), st.integers(1, 9))
def test_minmax_partition_matches_brute_force(m, parts):
    ranges, largest = minmax_partition(m, parts)
    k = min(parts, len(m))
    assert len(ranges) == k and ranges[0][0] == 0 and ranges[-1][1] == len(m)
    assert all(s < e for s, e in ranges)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert largest == max(sum(m[s:e]) for s, e in ranges)
    best = min(
        max(sum(m[a:b]) for a, b in itertools.pairwise((0, *cuts, len(m))))
        for cuts in itertools.combinations(range(1, len(m)), k - 1)
    )
    assert largest == best


def _unit(draw, i):
    b_in = draw(st.integers(0, 500))
    b_out = draw(st.integers(0, 500))
    return UnitProfile(
        name=f"u{i}",
        saved_bytes=draw(st.integers(0, 2000)),
        input_bytes=b_in,
        output_bytes=b_out,
        saves_input_bytes=draw(st.sampled_from([0, b_in])),
        saves_output_bytes=draw(st.sampled_from([0, b_out])),
        fwd_peak_bytes=draw(st.integers(0, 3000)),
        fwd_nograd_peak_bytes=draw(st.integers(0, 1000)),
        bwd_peak_bytes=draw(st.integers(0, 3000)),
        flops=draw(st.integers(1, 100)),
        param_bytes=draw(st.integers(0, 400)),
        param_numel=draw(st.integers(0, 100)),
    )


@st.composite
def profiles(draw, max_units=5):
    n = draw(st.integers(1, max_units))
    units = tuple(_unit(draw, i) for i in range(n))
    numel = sum(u.param_numel for u in units) + 10
    return ModelProfile(
        model="random", batch_size=1, dtype="fp32", device="meta", units=units,
        static_bytes=4 * numel + 100, param_bytes=4 * numel, tail_param_bytes=40,
        param_numel=numel, tail_param_numel=10, max_param_numel=max(numel // 2, 1),
        buffer_bytes=50, input_bytes=50, pre_saved_bytes=draw(st.integers(0, 100)),
        pre_peak_bytes=draw(st.integers(0, 500)), tail_saved_bytes=draw(st.integers(0, 300)),
        tail_saves_input_bytes=draw(st.sampled_from([0, units[-1].output_bytes])),
        tail_fwd_peak_bytes=draw(st.integers(0, 500)),
        tail_bwd_peak_bytes=draw(st.integers(0, 500)), step_flops=1000,
        measured_peak_bytes=0,
    )  # fmt: skip


configs = st.builds(
    MemoryConfig,
    world_size=st.integers(1, 4),
    sharded=st.booleans(),
    optimizer=st.sampled_from(["sgd", "adamw", "none"]),
    prefetch=st.integers(0, 2),
)


def all_segmentations(n):
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        ranges = list(itertools.pairwise(bounds))
        for types in itertools.product([False, True], repeat=len(ranges)):
            yield [(s, e, t) for (s, e), t in zip(ranges, types, strict=True)]


def recompute(prof, segs):
    return sum(u.flops for s, e, c in segs if c for u in prof.units[s:e])


@given(profiles(), configs, st.floats(0.0, 1.0))
def test_recompute_solver_is_the_exhaustive_optimum(prof, cfg, where):
    n = len(prof.units)
    plain = estimate(prof, [(0, n, False)], cfg).peak_bytes
    floor = static_floor_bytes(prof, cfg)
    budget = int(floor + where * (plain - floor))
    feasible = [
        recompute(prof, segs)
        for segs in all_segmentations(n)
        if estimate(prof, segs, cfg).peak_bytes <= budget
    ]
    got = solve_recompute(prof, cfg, budget)
    if not feasible:
        assert got is None
        return
    assert got is not None
    assert estimate(prof, got, cfg).peak_bytes <= budget
    assert recompute(prof, got) == min(feasible)


@given(
    profiles(max_units=7), configs, st.floats(0.0, 1.0), st.sampled_from(["recompute", "minmax"])
)
def test_a_plan_that_says_it_fits_fits(prof, cfg, where, objective):
    n = len(prof.units)
    plain = estimate(prof, [(0, n, False)], cfg).peak_bytes
    floor = static_floor_bytes(prof, cfg)
    budget = int(floor + where * (plain - floor))
    plan = plan_checkpoints(prof, budget, cfg, objective=objective)
    assert plan.peak_bytes == estimate(prof, list(plan.segments), cfg).peak_bytes
    assert plan.fits == (plan.peak_bytes <= budget)
    if objective == "recompute" and solve_recompute(prof, cfg, budget) is not None:
        assert plan.fits
    assert plan.peak_bytes_without_checkpointing == plain


@given(profiles(max_units=7), configs)
def test_minmax_raises_segments_until_it_fits(prof, cfg):
    n = len(prof.units)
    m = [u.activation_bytes for u in prof.units]
    peaks = []
    for s in range(1, n + 1):
        ranges, _ = minmax_partition(m, s)
        segs = [(a, b, k < len(ranges) - 1) for k, (a, b) in enumerate(ranges)]
        peaks.append(estimate(prof, segs, cfg).peak_bytes)
    budget = min(peaks)
    segs, _ = solve_minmax(prof, cfg, budget)
    assert len(segs) == peaks.index(budget) + 1  # the smallest S that fits


@given(profiles())
def test_budget_below_static_is_refused_with_what_would_help(prof):
    cfg = MemoryConfig(world_size=1, sharded=True)
    budget = static_floor_bytes(prof, cfg) - 1

    def feasible(world):
        c = dataclasses.replace(cfg, world_size=world)
        return static_floor_bytes(prof, c) <= budget and solve_recompute(prof, c, budget)

    with pytest.raises(FsdpkitError, match="alone need") as e:
        plan_checkpoints(prof, budget, cfg)
    m = re.search(r"world size >= (\d+) needed", str(e.value))
    if m:  # the smallest world size that works
        w = int(m.group(1))
        assert feasible(w) and not feasible(w - 1)
    else:
        assert "no world size helps" in str(e.value)
        assert not feasible(1 << 16)


@pytest.mark.parametrize("n", [1, 2, 5, 28, 100])
def test_sqrt_segments_tile_the_chain(n):
    segs = sqrt_segments(n)
    assert segs[0][0] == 0 and segs[-1][1] == n and not segs[-1][2]
    assert all(a[1] == b[0] for a, b in itertools.pairwise(segs))


@given(profiles(), configs, st.floats(0.0, 1.0))
def test_the_lower_bound_is_below_every_segmentation_that_fits(prof, cfg, where):
    """recompute_lower_bound against brute force: no fitting segmentation recomputes less;
    None only when none fits; 0 when the plain step fits."""
    n = len(prof.units)
    plain = estimate(prof, [(0, n, False)], cfg).peak_bytes
    floor = static_floor_bytes(prof, cfg)
    budget = int(floor + where * (plain - floor))
    bound = recompute_lower_bound(prof, budget, cfg, UnitCosts.flops(prof), selective=False)
    feasible = [
        recompute(prof, segs)
        for segs in all_segmentations(n)
        if estimate(prof, segs, cfg).peak_bytes <= budget
    ]
    if bound is None:
        assert not feasible
        return
    assert bound == 0.0 if plain <= budget else bound > 0.0
    if feasible:
        assert bound <= min(feasible) + 1e-9


@st.composite
def selective_profiles(draw):
    """Random profiles whose units may run selective, at up to three thresholds."""
    prof = draw(profiles(max_units=4))
    units = []
    for u in prof.units:
        if not draw(st.booleans()):
            units.append(u)
            continue
        kept = draw(st.integers(0, u.saved_bytes))
        flops = draw(st.integers(0, u.flops - 1)) if u.flops > 1 else 0
        variants = []
        for k in range(draw(st.integers(0, 2))):
            kept = draw(st.integers(0, kept))  # keeping fewer: fewer bytes, more FLOPs
            flops = draw(st.integers(flops, u.flops))
            # recomputation only adds to a backward's working set (the bound's premise)
            variants.append(SelVariant(float(k + 1), kept, 0, u.saved_bytes - kept, flops, {},
                                       draw(st.integers(u.bwd_peak_bytes, 4000))))  # fmt: skip
        units.append(dataclasses.replace(
            u, sel_saved_bytes=draw(st.integers(kept, u.saved_bytes)), sel_recompute_flops=flops
            if not variants else draw(st.integers(0, variants[0].recompute_flops)),
            sel_saves_output_bytes=draw(st.sampled_from([0, u.saves_output_bytes])),
            sel_bwd_peak_bytes=draw(st.integers(u.bwd_peak_bytes, 4000)),
            sel_variants=tuple(variants),
        ))  # fmt: skip
    return dataclasses.replace(prof, units=tuple(units))


def all_selective_plans(prof):
    """Every segmentation, and in its plain segments every unit kept or at any threshold."""
    for segs in all_segmentations(len(prof.units)):
        plain = [i for s, e, c in segs if not c for i in range(s, e)]
        choices = [[None, *prof.units[i].selective_thresholds] for i in plain]
        for pick in itertools.product(*choices):
            yield segs, [(i, t) for i, t in zip(plain, pick, strict=True) if t is not None]


@given(selective_profiles(), configs, st.floats(0.0, 1.0))
def test_the_selective_solver_is_the_exhaustive_optimum(prof, cfg, where):
    """Per unit: kept, selective at any profiled threshold, or in a checkpointed segment. The
    solver's cost equals the cheapest fitting choice found by enumeration, and its plan fits;
    the lower bound is below it."""
    n = len(prof.units)
    plain = estimate(prof, [(0, n, False)], cfg).peak_bytes
    floor = static_floor_bytes(prof, cfg)
    budget = int(floor + where * (plain - floor))
    costs = UnitCosts.flops(prof)

    def cost(segs, sel):
        options = {i: dict(costs.options(i)) for i, _ in sel}
        return recompute(prof, segs) + sum(options[i][t] for i, t in sel)

    feasible = [
        cost(segs, sel)
        for segs, sel in all_selective_plans(prof)
        if estimate(prof, segs, cfg, sel).peak_bytes <= budget
    ]
    got = solve_selective(prof, cfg, budget, costs)
    bound = recompute_lower_bound(prof, budget, cfg, costs)
    if not feasible:
        assert got is None
        return
    segs, sel = got
    assert estimate(prof, segs, cfg, sel).peak_bytes <= budget
    assert cost(segs, sel) == min(feasible)
    assert bound is not None and bound <= min(feasible) + 1e-9
