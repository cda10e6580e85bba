"""Recomputation ends at a region's last save for backward (torch's early stop): the planner
prices exactly what the backward runs again, on models whose units end with operators that
save nothing after them (a transformer layer's ``x + fc2(h)``) and on models whose do."""

import oracle_models as om
import pytest
import toy_models
from recompute_fns import backward_flops

from kitcore import get_model_spec
from planner import MemoryConfig, UnitCosts, profile_model
from planner.plan import make_plan
from planner.profile import early_stop_savings, segment_recompute

pytest.importorskip("transformers")

MODELS = {
    "tiny": lambda: get_model_spec("tiny"),
    "toy-vit": toy_models.vit_spec,
    "hf-vit": om.HF_SPECS["vit"],
}


def _plans(n: int):
    """Checkpointed segments ending inside and at the chain's end, and selective units."""
    yield [(0, 2, True), (2, n, False)], ()
    yield [(0, 1, False), (1, n, True)], ()
    yield [(0, n - 1, True), (n - 1, n, False)], ()
    yield [(0, n, False)], tuple((i, 0.0) for i in range(1, n))


@pytest.mark.parametrize("name", list(MODELS))
def test_planned_recompute_flops_are_what_the_backward_runs_again(name):
    spec = MODELS[name]()
    prof = profile_model(spec, 2)
    n = len(prof.units)
    plain = backward_flops(spec)[0]
    for segments, selective in _plans(n):
        if selective and not all(prof.units[i].has_selective for i, _ in selective):
            continue
        plan = make_plan(prof, segments, MemoryConfig(), budget_bytes=1 << 40,
                         objective="recompute", selective=selective)  # fmt: skip
        assert backward_flops(spec, plan)[0] - plain == plan.recompute_flops, (segments, selective)


def test_a_layer_ending_in_a_product_then_an_add_is_not_recomputed_to_its_end():
    """toy-vit's layers end ``x + fc2(h)``: fc2's input is saved before fc2 runs, so a
    segment ending there stops before fc2 (a quarter of the layer's FLOPs); a segment ending
    in tiny's RegNet blocks (``relu_(shortcut + f)``, its result saved) recomputes all."""
    vit, tiny = profile_model(MODELS["toy-vit"](), 2), profile_model(MODELS["tiny"](), 2)
    layer = vit.units[1]
    assert 0 < layer.stop_skip_flops < layer.flops and not layer.saves_nothing
    n = len(vit.units)
    whole = sum(u.flops for u in vit.units[1:])
    assert segment_recompute(vit, 1, n) == whole - vit.units[-1].stop_skip_flops
    assert all(u.stop_skip_flops == 0 for u in tiny.units)
    costs = UnitCosts.roofline(vit, "h100-80gb")
    assert costs.cheapest(1) < costs.full[1]
    assert segment_recompute(vit, 1, n, "h100-80gb") == pytest.approx(
        sum(costs.full[1:]) - costs.skip[n - 1], rel=1e-12
    )


def test_a_unit_that_saves_nothing_moves_the_stop_into_the_unit_before_it():
    skip, saves = [1, 2, 5, 7], [True, True, False, False]
    assert early_stop_savings(skip, saves, 0, 4) == 7 + 5 + 2
    assert early_stop_savings(skip, saves, 2, 4) == 7 + 5
    assert early_stop_savings(skip, saves, 0, 2) == 2
    assert early_stop_savings([], [], 0, 4) == 0  # profiles from before early stop was known
