"""Profiler and memory model against real CPU steps (the accuracy target is 5%)."""

import dataclasses
import json

import pytest
import torch

from fsdpkit import FsdpkitError, get_model_spec
from fsdpkit.ac import apply_ac, remove_ac
from kitcore import module_spec
from planner import (
    MemoryConfig,
    ModelProfile,
    emulate_mixed_precision,
    estimate,
    measure_step,
    plan_checkpoints,
    profile_model,
)

# Single-process FP32 SGD(momentum, weight decay): what measure_step runs.
STEP = MemoryConfig(optimizer="sgd", weight_decay=True)


def test_symbolic_and_measured_cpu_profiles_agree():
    spec = get_model_spec("tiny")
    meta = profile_model(spec, 3, device="meta")
    cpu = profile_model(spec, 3, device="cpu")
    assert meta.units == cpu.units
    assert meta.measured_peak_bytes == cpu.measured_peak_bytes


@pytest.mark.parametrize("name", ["tiny", "toy_models:vit_spec"])
def test_memory_model_reproduces_the_profiled_plain_step(name):
    prof = profile_model(get_model_spec(name), 4)
    n = len(prof.units)
    est = estimate(prof, [(0, n, False)], MemoryConfig(optimizer="none"))
    # exact but for the gradients of a multi-input unit's later outputs, which MemTracker sees
    # alive through the unit's backward and the profile's hooks do not (an upper bound)
    slack = max(u.later_output_bytes for u in prof.units)
    assert 0 <= est.peak_bytes - prof.measured_peak_bytes <= 64 + slack


def test_unit_flops_add_up_to_the_forward():
    prof = profile_model(get_model_spec("tiny"), 2)
    from seer_train.models import PRESETS

    preset = PRESETS["tiny"]
    analytic = sum(sum(c.flops for c in preset.regnet.unit_costs(s)) for s in preset.crop_sizes)
    assert sum(u.flops for u in prof.units) == 2 * analytic  # batch 2


def _plans(prof):
    """(segments, selective units) of no checkpointing, and of the planner's plan for a
    budget halfway from the plain peak to the lowest one checkpointing reaches (every unit
    its own segment)."""
    n = len(prof.units)
    plain = estimate(prof, [(0, n, False)], STEP).peak_bytes
    lowest = estimate(prof, [(i, i + 1, True) for i in range(n)], STEP).peak_bytes
    budget = (plain + lowest) // 2
    plan = plan_checkpoints(prof, budget, STEP)
    assert plan.fits and set(plan.choices()) != {"keep"}
    return {"none": ([(0, n, False)], []), "planned": (list(plan.segments), plan.selective_spec)}


@pytest.mark.parametrize(
    ("name", "batch"),
    # rg8gf at batch 1 only: batch 2 adds a minute of CPU and no other shape
    [("tiny", 4), ("tiny", 16), ("rg8gf", 1), ("toy_models:vit_spec", 8)],
)
def test_predicted_peak_covers_a_real_cpu_step_within_3_percent(name, batch):
    spec = get_model_spec(name)
    prof = profile_model(spec, batch)  # symbolic: meta device
    for label, (segments, selective) in _plans(prof).items():
        predicted = estimate(prof, segments, STEP, selective).peak_bytes
        measured = measure_step(spec, batch, segments, selective=selective).peak_bytes
        assert measured <= predicted <= 1.03 * measured, (label, predicted, measured)


def test_checkpointing_saves_what_the_plan_says():
    spec = get_model_spec("tiny")
    prof = profile_model(spec, 8)
    plans = _plans(prof)
    none = measure_step(spec, 8, plans["none"][0]).peak_bytes
    segments, selective = plans["planned"]
    planned = measure_step(spec, 8, segments, selective=selective).peak_bytes
    assert planned < none


def test_apply_ac_keeps_outputs_and_gradients():
    spec = get_model_spec("tiny")
    torch.manual_seed(0)
    model = spec.build_model("cpu").eval()  # eval: BN statistics untouched by recompute
    x = spec.example_input(2, torch.device("cpu"))
    ref = spec.training_loss(model(x))
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    class P:
        units = tuple(n for n, _ in spec.named_units(model))
        segments = ((0, 2, True), (2, 3, False), (3, 6, True))

    assert apply_ac(model, P) == 2
    loss = spec.training_loss(model(x))
    loss.backward()
    torch.testing.assert_close(loss, ref)
    for p, g in zip(model.parameters(), ref_grads, strict=True):
        torch.testing.assert_close(p.grad, g)
    remove_ac(model)
    loss = spec.training_loss(model(x))
    torch.testing.assert_close(loss, ref)


def test_recomputation_leaves_batchnorm_statistics_alone():
    spec = get_model_spec("tiny")
    torch.manual_seed(0)
    plain = spec.build_model("cpu").train()
    ckpt = spec.build_model("cpu").train()
    ckpt.load_state_dict(plain.state_dict())

    class P:
        units = tuple(n for n, _ in spec.named_units(ckpt))
        segments = ((0, 6, True),)

    apply_ac(ckpt, P)
    x = spec.example_input(2, torch.device("cpu"))
    for model in (plain, ckpt):
        spec.training_loss(model(x)).backward()
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    for a, b in zip(plain.parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    with pytest.raises(FsdpkitError, match="already checkpointed"):
        apply_ac(ckpt, P)


def test_apply_ac_rejects_a_plan_for_another_model():
    model = get_model_spec("toy_models:vit_spec").build_model("meta")

    class P:
        units = ("trunk.units.0", "trunk.units.1")
        segments = ((0, 2, True),)

    with pytest.raises(FsdpkitError, match=r"no unit 'trunk\.units\.0'"):
        apply_ac(model, P)

    class Empty:
        units = ()
        segments = ()

    with pytest.raises(FsdpkitError, match="no units"):
        apply_ac(model, Empty)


def test_mixed_precision_emulation_keeps_batchnorm_in_fp32():
    model = emulate_mixed_precision(get_model_spec("tiny").build_model("meta"), torch.float16)
    for m in model.modules():
        for p in m.parameters(recurse=False):
            want = torch.float32 if isinstance(m, torch.nn.BatchNorm2d) else torch.float16
            assert p.dtype == want
    fp16 = profile_model(get_model_spec("tiny"), 4, dtype="fp16")
    fp32 = profile_model(get_model_spec("tiny"), 4, dtype="fp32")
    assert fp16.units[3].output_bytes * 2 == fp32.units[3].output_bytes


def test_profile_json_round_trip_and_minimal_form(tmp_path):
    prof = profile_model(get_model_spec("tiny"), 2)
    path = tmp_path / "p.json"
    prof.save(path)
    assert ModelProfile.load(path) == prof
    minimal = ModelProfile.from_json({"units": ["a", "b"], "activation_bytes": [10, 20]})
    assert [u.activation_bytes for u in minimal.units] == [10, 20]


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        json.dumps({"units": ["a"]}),
        json.dumps({"units": ["a"], "activation_bytes": [-1]}),
    ],
)
def test_malformed_profiles_are_one_line_errors(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(FsdpkitError) as e:
        ModelProfile.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_bad_batch_and_dtype():
    spec = get_model_spec("tiny")
    with pytest.raises(FsdpkitError, match="batch size"):
        profile_model(spec, 0)
    with pytest.raises(FsdpkitError, match="dtype"):
        profile_model(spec, 1, dtype="fp8")


class _ReadsAUnitsDtype(torch.nn.Module):
    """Casts its input to a unit's weight dtype before the units, as transformers' ViTModel
    does: under FSDP2 mixed precision that weight is sharded FP32 there."""

    def __init__(self) -> None:
        super().__init__()
        self.units = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.units[0].weight.dtype)
        for unit in self.units:
            x = torch.relu(unit(x))
        return x


def test_low_precision_profile_shows_the_code_sharded_fp32_parameters_outside_units():
    spec = module_spec(_ReadsAUnitsDtype, (64,), name="reads-dtype", units="units.*")
    low = profile_model(spec, 8, dtype="bf16")
    # the code's FP32 copy of the (bf16-cast) input lives through the forward; unit 0 gets
    # the bf16 copy FSDP2's hook makes, as its input
    assert low.pre_held_bytes == 8 * 64 * 4
    assert low.units[0].input_bytes == 8 * 64 * 2 and low.raw_input_bytes == 8 * 64 * 4
    full = profile_model(spec, 8)
    assert full.pre_held_bytes == 0 and full.units[0].input_bytes == 0  # the input itself


def test_a_profile_without_selective_passes_plans_whole_units_alike_and_scales():
    """``selective=False`` skips the op-level passes: no unit is offered selective
    checkpointing, every other term is the same, so whole-unit plans are identical; and such a
    profile scales to other batches (what ``largest_batch`` does)."""
    from planner.advise import largest_batch, scale_profile

    spec = get_model_spec("tiny")
    full, bare = profile_model(spec, 4), profile_model(spec, 4, selective=False)
    assert any(u.has_selective for u in full.units)
    assert not any(u.has_selective for u in bare.units)
    strip = {"sel_saved_bytes": None, "sel_saves_output_bytes": 0, "sel_recomputed_bytes": 0,
             "sel_recompute_flops": 0, "sel_bwd_peak_bytes": None, "sel_recompute_time_s": {},
             "sel_variants": ()}  # fmt: skip
    assert [dataclasses.replace(u, **strip) for u in full.units] == list(bare.units)
    cfg = MemoryConfig()
    budget = estimate(full, [(0, len(full.units), False)], cfg).peak_bytes * 3 // 4
    a = plan_checkpoints(full, budget, cfg, granularity="unit")
    b = plan_checkpoints(bare, budget, cfg, granularity="unit")
    assert (a.segments, a.recompute_time_s) == (b.segments, b.recompute_time_s)
    scaled = scale_profile(full, 8)
    assert scaled.batch_size == 8 and not any(u.has_selective for u in scaled.units)
    assert largest_batch(scale_profile(bare, 64), cfg, budget, spec) in range(1, 64)
