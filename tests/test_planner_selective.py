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
from recompute_fns import backward_flops
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
        assert estimate(prof, list(op.segments), cfg, op.selective_spec).peak_bytes <= budget
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


class _Mutates(nn.Module):
    """h = conv(x); w = h * h, then add_ on it (not idempotent); g = sigmoid(h);
    conv(addcmul(w, w, g)). By score: addcmul (4 tensors moved per output), then w (3), then g
    (2). Keeping addcmul's output alone is safe and frees w and g for less than the base rule;
    keeping w too would free g for less still, but recomputation would add 1 to w twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.a(x)
        w = h * h
        w.add_(1.0)
        return self.b(torch.addcmul(w, w, h.sigmoid())) * 0.5


def test_a_rule_that_keeps_an_output_later_written_in_place_is_not_offered(monkeypatch):
    """Rules by score may keep any operator's output; the cache would then hold a tensor the
    code later changes, and recomputation would apply the change again (here ``add_``: +1
    twice). Offered over every level of the score order, no variant keeps such an output, and
    every one that is offered trains like a plain step (float64)."""
    from kitcore.selective import op_score
    from planner import sel_profile

    monkeypatch.setattr(sel_profile, "SEL_VARIANTS", 7)  # every level that qualifies
    monkeypatch.setattr("planner.profile.SEL_VARIANTS", 7)

    def build(device):
        torch.manual_seed(0)
        return nn.Sequential(_Mutates(), _Mutates()).to(device)

    def example_input(batch, device):
        return torch.randn(batch, 4, 6, 6, generator=torch.Generator().manual_seed(1)).to(device)

    spec = ModelSpec(
        name="mutates",
        build=build,
        example_input=example_input,
        units=lambda m: [m[0], m[1]],
        loss=lambda out: out.square().mean(),
    )
    prof = profile_model(spec, 2)
    y = torch.empty(2, 4, 6, 6)
    mul = torch.ops.aten.mul.Tensor
    written = op_score(mul, (y, y), {}, y)  # w = h * h, then add_
    assert all(u.has_selective for u in prof.units)
    offered = [t for u in prof.units for t in u.selective_thresholds[1:]]
    assert offered and all(t > written for t in offered)
    grads = {}
    for t in (None, *sorted(set(offered))):
        model = spec.build_model("cpu").double()
        if t is not None:
            plan = Plan_(["0", "1"], [(0, 2, False)], (0, 1))
            plan.selective_min_intensity = (t / 2, t / 2)  # float64 scores half of float32
            apply_ac(model, plan)
        spec.training_loss(model(spec.example_input(2, "cpu").double())).backward()
        grads[t] = [p.grad for p in model.parameters()]
    for t in offered:
        for a, b in zip(grads[None], grads[t], strict=True):
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


@pytest.mark.parametrize("name", ["tiny", "toy-vit"])
def test_a_variant_recomputes_exactly_the_kept_operators_below_its_threshold(name):
    """A unit's variant (kitcore.selective.keeps) as apply_ac runs it: gradients equal a
    plain step's in float64, and its backward runs exactly the FLOPs beyond a plain step's
    that the profile says it recomputes (torch's FLOP formulas over every operator the
    backward dispatches)."""
    spec, prof = MODELS[name](), _profile(name)
    i = next(i for i, u in enumerate(prof.units) if len(u.selective_thresholds) > 1)
    u = prof.units[i]
    units = [n for n, _ in spec.named_units(spec.build_model("meta"))]
    grads, flops = [], {}
    for t in (None, *u.selective_thresholds):
        plan = None
        if t is not None:
            plan = Plan_(units, [(0, len(units), False)], (i,))
            # FLOPs per byte: float64 outputs have twice the bytes of the profiled float32
            plan.selective_min_intensity = (t / 2,)
        flops[t], g = backward_flops(spec, plan)
        grads.append(g)
    for ref, other in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(ref, other, rtol=1e-12, atol=1e-14)
    for t, v in zip(u.selective_thresholds[1:], u.sel_variants, strict=True):
        for ref, other in zip(grads[0], grads[1 + u.selective_thresholds.index(t)], strict=True):
            torch.testing.assert_close(ref, other, rtol=1e-12, atol=1e-14)
        assert flops[t] - flops[None] == v.recompute_flops, (t, flops)
    assert flops[0.0] - flops[None] == u.sel_recompute_flops, flops
    # a variant that keeps less than every kept operator runs some of their FLOPs again
    assert any(v.recompute_flops > u.sel_recompute_flops for v in u.sel_variants)


def test_the_intensity_policy_decides_alike_without_the_operators_output():
    """torch releases before op_output ask the policy before the operator runs: the output's
    shape then comes from meta tensors, and the decision is the same. The score is the
    roofline time per output byte in FLOPs per byte: a widening 1x1 convolution's is bound by
    its bytes and lies below a ReLU's; a cast (FSDP2 runs them around units) is never kept."""
    from torch.utils.checkpoint import CheckpointPolicy, SelectiveCheckpointContext

    from fsdpkit.ac import _intensity_policy
    from kitcore.selective import REFERENCE_RIDGE, op_intensity, op_score

    x, w = torch.randn(2, 8, 5, 5), torch.randn(32, 8, 1, 1)
    conv = torch.ops.aten.convolution.default
    args = (x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    out = conv(*args)
    assert op_intensity(conv, args, {}, out) == 2 * 8 / 4  # 2 FLOPs per MAC, 8 in, 4 B out
    ridge = REFERENCE_RIDGE[torch.float32]
    score = op_score(conv, args, {}, out)
    assert score == pytest.approx(ridge * (x.nbytes + w.nbytes + out.nbytes) / out.nbytes)
    relu = torch.ops.aten.relu.default
    assert op_score(relu, (x,), {}, relu(x)) == pytest.approx(2 * ridge)
    assert 2 * ridge > score
    cast = torch.ops.aten._to_copy.default
    for threshold, kept in ((score * 0.99, True), (score * 1.01, False)):
        policy = _intensity_policy(threshold)
        for ctx in (SelectiveCheckpointContext(is_recompute=False, op_output=out),
                    SelectiveCheckpointContext(is_recompute=False)):  # fmt: skip
            decision = policy(ctx, conv, *args)
            assert (decision == CheckpointPolicy.MUST_SAVE) == kept
        bare = SelectiveCheckpointContext(is_recompute=False)
        assert policy(bare, relu, x) == CheckpointPolicy.MUST_SAVE
        assert policy(bare, cast, x, dtype=torch.float16) == CheckpointPolicy.PREFER_RECOMPUTE
    # inside an autograd.Function's forward (grad off: SyncBN across ranks composes its own
    # ops there, the profiled single-rank step does not) a rule by score keeps nothing
    with torch.no_grad():
        bare = SelectiveCheckpointContext(is_recompute=False)
        assert policy(bare, relu, x) == CheckpointPolicy.PREFER_RECOMPUTE
    zero = _intensity_policy(0.0)  # threshold 0: the kept operators, nothing else
    ctx = SelectiveCheckpointContext(is_recompute=False)
    assert zero(ctx, conv, *args) == CheckpointPolicy.MUST_SAVE
    assert zero(ctx, relu, x) == CheckpointPolicy.PREFER_RECOMPUTE


def test_bad_thresholds_are_refused_in_one_line(tmp_path):
    """A plan whose thresholds do not match its selective units, or a threshold the profile
    never measured, is an error naming what is wrong, not a silent plain unit."""
    prof = _profile("tiny")
    n = len(prof.units)
    plan = plan_checkpoints(prof, estimate(prof, [(0, n, False)], MemoryConfig()).peak_bytes,
                            MemoryConfig())  # fmt: skip
    data = {**plan.to_json(), "selective": [1, 2], "selective_min_intensity": [3.0]}
    with pytest.raises(FsdpkitError, match="one entry per selective unit"):
        Plan.from_json(data)
    # a plan written when thresholds meant convolution intensity is refused, not reread
    older = {**plan.to_json(), "selective": [1], "selective_min_intensity": [28.0]}
    assert Plan.from_json(older).selective_min_intensity == (28.0,)
    del older["selective_rule"]
    with pytest.raises(FsdpkitError, match=r"older fsdpkit wrote them.*re-plan") as e:
        Plan.from_json(older)
    assert "\n" not in str(e.value)
    assert Plan.from_json({**older, "selective_min_intensity": [0.0]}).selective == (1,)
    spec = MODELS["tiny"]()
    bad = Plan_(list(plan.units), [(0, n, False)], (1, 2))
    bad.selective_min_intensity = (3.0,)
    with pytest.raises(FsdpkitError, match="2 selective units"):
        apply_ac(spec.build_model("cpu"), bad)
    with pytest.raises(FsdpkitError, match="not profiled with selective threshold 3"):
        estimate(prof, [(0, n, False)], MemoryConfig(), [(1, 3.0)])


@pytest.mark.parametrize("name", ["tiny", "toy-vit", "hf-regnet"])
def test_every_variant_offered_frees_bytes_and_no_option_beats_it_on_both_counts(name):
    """A variant is worth a profiling pass only if it frees activation bytes against keeping
    the unit plain and neither the base rule, another variant, nor checkpointing the unit
    frees as much for no more recompute time (planner.sel_profile.variant_thresholds)."""
    prof = _profile(name)
    offered = 0
    for u in prof.units:
        if not u.has_selective:
            continue
        options = [
            (
                u.saved_bytes - u.sel_terms(t).saved_bytes,
                u.sel_terms(t).recompute_time_s[DEFAULT_GPU],
            )
            for t in u.selective_thresholds
        ]
        whole = u.fwd_time_s[DEFAULT_GPU] - u.stop_skip_time_s.get(DEFAULT_GPU, 0.0)
        options.append((u.saved_bytes, whole))  # checkpointed as its own segment
        for k, (freed, time) in enumerate(options[1:-1], start=1):
            offered += 1
            assert freed > 0, (u.name, u.selective_thresholds[k])
            beaten = [o for j, o in enumerate(options) if j != k and o[0] >= freed and o[1] <= time]
            assert not beaten, (u.name, u.selective_thresholds[k], options)
    assert offered > 0
