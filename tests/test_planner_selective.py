"""Op-level selective checkpointing: what the profile sees, what the solver chooses, what the
wrapper runs (gradients equal a plain step), and the CLI's devices and granularity."""

import functools
import json

import oracle_models as om
import pytest
import torch
import toy_models
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fsdpkit import FsdpkitError, apply_ac
from fsdpkit.cli import main
from kitcore import ModelSpec, get_model_spec
from planner import (
    MemoryConfig,
    Plan,
    UnitCosts,
    estimate,
    plan_checkpoints,
    profile_model,
    recompute_lower_bound,
)
from planner.devices import DEFAULT_GPU, GPUS, roofline_seconds
from planner.memory import static_floor_bytes

pytest.importorskip("transformers")

MODELS = {
    "tiny": lambda: get_model_spec("tiny"),
    "toy-vit": toy_models.vit_spec,
    "hf-regnet": om.HF_SPECS["regnet"],
    "hf-convnext": om.HF_SPECS["convnext"],
}


@functools.cache
def _profile(name: str, batch: int = 2):
    return profile_model(MODELS[name](), batch)


@pytest.mark.parametrize("name", list(MODELS))
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(frac=st.floats(0.0, 1.0))
def test_op_granularity_fits_whenever_units_fit_and_recomputes_no_longer(name, frac):
    """Per unit, op granularity may also choose "selective": the unit-only optimum is one of
    its candidates, so it is never more expensive, and every plan it returns as fitting fits
    the memory model's replay."""
    prof = _profile(name)
    cfg = MemoryConfig()
    n = len(prof.units)
    plain = estimate(prof, [(0, n, False)], cfg).peak_bytes
    floor = static_floor_bytes(prof, cfg)
    budget = int(floor + frac * (plain - floor))
    unit = plan_checkpoints(prof, budget, cfg, granularity="unit")
    op = plan_checkpoints(prof, budget, cfg, granularity="op")
    assert unit.selective == ()
    if unit.fits:
        assert op.fits
        # both optimal up to the fronts' bucketing (1/512 of the budget in stored bytes)
        assert op.recompute_time_s <= unit.recompute_time_s * 1.05 + 1e-12
    if op.fits:
        assert estimate(prof, list(op.segments), cfg, op.selective).peak_bytes <= budget
    # no plan of the same choices recomputes less than the lower bound
    costs = UnitCosts.roofline(prof, DEFAULT_GPU)
    for plan, sel in ((op, True), (unit, False)):
        bound = recompute_lower_bound(prof, budget, cfg, costs, selective=sel)
        if plan.fits:
            assert bound is not None and bound <= plan.recompute_time_s * (1 + 1e-9)


def test_the_profile_prices_units_on_every_named_gpu():
    prof = _profile("hf-regnet")
    for u in prof.units:
        assert set(u.fwd_time_s) == set(GPUS)
        for gpu in GPUS:  # recomputing the cheap ops costs part of the forward
            assert 0 < u.sel_recompute_time_s[gpu] < u.fwd_time_s[gpu]
        assert u.sel_saved_bytes + u.sel_saves_output_bytes < u.activation_bytes
    assert prof.step_time_s["h200"] < prof.step_time_s["v100-32gb"]
    # the roofline: bandwidth-bound below the ridge point, compute-bound above it
    h100 = GPUS["h100-80gb"]
    assert roofline_seconds(1e9, 1e9, h100, "fp16") == 1e9 / h100.bandwidth
    assert roofline_seconds(1e15, 1e6, h100, "fp16") == 1e15 / h100.flops_16


class _Unit(nn.Module):
    """conv -> an in-place op on the convolution's output -> conv."""

    def __init__(self, inplace: str) -> None:
        super().__init__()
        self.a, self.b, self.inplace = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), inplace

    def forward(self, x):
        y = self.a(x)
        y = y.relu_() if self.inplace == "relu_" else y.mul_(2.0)
        return self.b(y).tanh()


def _spec(inplace: str) -> ModelSpec:
    def build(device):
        torch.manual_seed(0)
        return nn.Sequential(_Unit(inplace), _Unit(inplace)).to(device)

    def example_input(batch, device):
        return torch.randn(batch, 4, 6, 6, generator=torch.Generator().manual_seed(1)).to(device)

    return ModelSpec(
        name=f"inplace-{inplace}",
        build=build,
        example_input=example_input,
        units=lambda m: [m[0], m[1]],
        loss=lambda out: out.square().mean(),
    )


@pytest.mark.parametrize(("inplace", "offered"), [("relu_", True), ("mul_", False)])
def test_a_unit_that_mutates_a_kept_output_in_place_is_offered_selective_only_if_harmless(
    inplace, offered
):
    """relu_ applied again to its own result changes nothing; mul_ would double: such a unit
    is not offered selective checkpointing. Where it is, gradients equal a plain step's."""
    spec = _spec(inplace)
    prof = profile_model(spec, 2)
    assert [u.has_selective for u in prof.units] == [offered, offered]
    if not offered:
        return
    grads = []
    for selective in ((), (0, 1)):
        model = spec.build_model("cpu").double()
        apply_ac(model, Plan_(["0", "1"], [(0, 2, False)], selective))
        spec.training_loss(model(spec.example_input(2, "cpu").double())).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


class Plan_:
    def __init__(self, units, segments, selective):
        self.units, self.segments, self.selective = units, segments, selective


def test_a_selective_unit_inside_a_checkpointed_segment_is_refused():
    spec = _spec("relu_")
    with pytest.raises(FsdpkitError, match="selective but not in a plain segment"):
        apply_ac(spec.build_model("cpu"), Plan_(["0", "1"], [(0, 2, True)], (1,)))
    with pytest.raises(FsdpkitError, match="both selective and in a checkpointed segment"):
        estimate(profile_model(spec, 2), [(0, 2, True)], MemoryConfig(), [1])


def test_plan_json_round_trips_with_choices_and_time(tmp_path):
    prof = _profile("tiny")
    cfg = MemoryConfig()
    n = len(prof.units)
    plain = estimate(prof, [(0, n, False)], cfg).peak_bytes
    plan = plan_checkpoints(prof, int(plain * 0.8), cfg, device="a100-80gb")
    assert plan.cost_device == "a100-80gb" and 0 < plan.recompute_time_fraction < 1
    plan.save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["choices"] == plan.choices() and len(data["choices"]) == n
    assert data["recompute_time_fraction"] == plan.recompute_time_fraction
    assert Plan.load(tmp_path / "p.json") == plan


def test_cli_gpu_is_the_default_budget_and_unit_granularity_has_no_selective(capsys):
    argv = ["plan", "--model", "tiny", "--batch", "8", "--json", "--overhead", "0"]
    assert main([*argv, "--gpu", "v100-32gb"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["budget_bytes"] == GPUS["v100-32gb"].memory_bytes
    assert out["budget_source"] == "--gpu v100-32gb memory" and out["cost_device"] == "v100-32gb"
    assert main([*argv, "--gpu-mem", "20MiB", "--granularity", "unit"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["selective"] == [] and "selective" not in out["choices"]
    assert main([*argv, "--gpu-mem", "20MiB"]) == 0  # op granularity: may choose selective
    op = json.loads(capsys.readouterr().out)
    assert op["fits"] and op["recompute_time_fraction"] <= out["recompute_time_fraction"] + 1e-12
