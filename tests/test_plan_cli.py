"""``fsdpkit plan`` and ``fsdpkit profile``: JSON contract, plots, and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsdpkit.cli import main
from kitcore.units import format_bytes, parse_bytes

TESTS = Path(__file__).parent
REQUIRED = {
    "units", "activation_bytes", "segments", "peak_bytes", "peak_bytes_without_checkpointing",
    "budget_bytes", "fits", "recompute_flops", "recompute_fraction", "objective",
}  # fmt: skip
VIT_MODULE = ["plan", "--model", "oracle_models:vit_module", "--batch", "2", "--input"]
REGNET10B_WS1 = ["plan", "--model", "regnet10b", "--batch", "16", "--world-size", "1"]


def run_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_json_has_the_contract(capsys):
    out = run_json(capsys, "plan", "--model", "tiny", "--batch", "8", "--gpu-mem", "64MiB",
                   "--overhead", "0")  # fmt: skip
    assert set(out) >= REQUIRED
    assert out["units"] == [f"trunk.units.{i}" for i in range(6)]
    assert out["budget_bytes"] == 64 * 2**20 and out["objective"] == "recompute"
    assert out["fits"] == (out["peak_bytes"] <= out["budget_bytes"])
    assert out["segments"][0][0] == 0 and out["segments"][-1][1] == 6


def test_plan_defaults_to_40_gib_without_a_gpu(capsys):
    out = run_json(capsys, "plan", "--model", "tiny", "--batch", "2")
    assert out["budget_bytes"] == 40 * 2**30 and "40 GiB assumed" in out["budget_source"]


def test_fixed_segments_report_the_largest_segment(capsys):
    out = run_json(capsys, "plan", "--model", "tiny", "--batch", "4", "--segments", "3")
    assert len(out["segments"]) == 3 and out["max_segment_bytes"] > 0
    assert out["objective"] == "minmax (S=3)"


def test_plan_from_a_minimal_profile(tmp_path, capsys):
    path = tmp_path / "prof.json"
    path.write_text(json.dumps({"units": ["a", "b", "c", "d"], "activation_bytes": [4, 3, 2, 1]}))
    out = run_json(capsys, "plan", "--profile", str(path), "--gpu-mem", "1KiB", "--overhead",
                   "0", "--no-fsdp")  # fmt: skip
    assert out["units"] == ["a", "b", "c", "d"] and out["fits"]


def test_when_nothing_fits_it_says_the_largest_batch(capsys):
    argv = ["plan", "--model", "tiny", "--batch", "64", "--no-fsdp", "--dtype", "fp32"]
    out = run_json(capsys, *argv, "--gpu-mem", "40MiB", "--overhead", "0")
    assert not out["fits"]
    b = out["largest_batch_that_fits"]
    assert 1 <= b < 64
    fits = run_json(capsys, *argv[:4], str(b), *argv[5:], "--gpu-mem", "40MiB", "--overhead", "0")
    assert fits["fits"]


def test_when_activations_do_not_fit_it_says_batch_and_world_size(capsys):
    # the advice is about whole-unit plans (planner.advise): no op-level profiling passes
    argv = ["plan", "--model", "regnet10b", "--world-size", "6", "--gpu-mem", "40",
            "--granularity", "unit"]  # fmt: skip
    out = run_json(capsys, *argv, "--batch", "64")
    assert not out["fits"] and out["world_size_needed"] > 6
    b = out["largest_batch_that_fits"]
    assert 16 <= b < 64
    assert run_json(capsys, *argv, "--batch", str(b))["fits"]
    assert not run_json(capsys, *argv, "--batch", str(b + 1))["fits"]
    at_world = ["--world-size", str(out["world_size_needed"]), "--batch", "64"]
    assert run_json(capsys, *argv[:3], *at_world, *argv[5:])["fits"]


def test_plan_table_and_plot(tmp_path, capsys):
    png = tmp_path / "fig4.png"
    argv = ["plan", "--model", "tiny", "--batch", "8", "--gpu-mem", "30MiB", "--overhead", "0"]
    assert main([*argv, "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "trunk.units.0" in out and "Per-rank memory at the peak" in out and "fits" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_profile_on_cpu_compares_with_the_symbolic_prediction(tmp_path, capsys):
    svg = tmp_path / "step.svg"
    out = run_json(capsys, "profile", "--model", "tiny", "--batch", "2", "--device", "cpu",
                   "--plot", str(svg), "--gpu-mem", "20MiB")  # fmt: skip
    c = out["comparison"]
    assert (
        abs(c["predicted_peak_bytes"] - c["measured_peak_bytes"]) <= 0.05 * c["measured_peak_bytes"]
    )
    assert "<svg" in svg.read_text()[:500]


def test_profile_save_then_plan_from_it(tmp_path, capsys):
    path = tmp_path / "tiny.json"
    assert main(["profile", "--model", "tiny", "--batch", "4", "--save", str(path)]) == 0
    capsys.readouterr()
    budget = ["--gpu-mem", "30MiB", "--overhead", "0"]
    direct = run_json(capsys, "plan", "--model", "tiny", "--batch", "4", "--dtype", "fp32", *budget)
    saved = run_json(capsys, "plan", "--profile", str(path), *budget)
    assert saved["segments"] == direct["segments"] and saved["peak_bytes"] == direct["peak_bytes"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "--model", "resnet50", "--batch", "2"], "known models"),
        (["plan", "--model", "tiny", "--batch", "0"], "--batch must be >= 1"),
        (["plan", "--model", "tiny"], "--batch is required"),
        (["plan", "--batch", "2"], "--model is required"),
        (["plan", "--model", "tiny", "--batch", "2", "--gpu-mem", "forty"], "not a size"),
        (["plan", "--profile", "/nonexistent/p.json"], "cannot read profile"),
        ([*REGNET10B_WS1, "--gpu-mem", "40", "--granularity", "unit"], "world size >= 4 needed"),
        (["plan", "--model", "tiny", "--batch", "2", "--gpu-mem", "512MiB"], "lower --overhead"),
        (["plan", "--model", "tiny", "--batch", "2", "--plot", "x.jpg"], "png or .svg"),
        (["profile", "--model", "tiny", "--batch", "-3"], "--batch must be >= 1"),
        ([*VIT_MODULE, "3by32"], "not a shape"),
        ([*VIT_MODULE, "3x32x32", "--units", "nothing.*"], "matches no module"),
        (["plan", "--model", "tiny", "--batch", "2", "--input", "3x32x32"], "module:factory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_malformed_profile_file_via_the_console_script(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"units": [1, 2], "activation_bytes": ')
    script = Path(sys.executable).parent / "fsdpkit"
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    r = subprocess.run([script, "plan", "--profile", str(bad)], capture_output=True, text=True,
                       env=env)  # fmt: skip
    assert r.returncode == 2 and "malformed JSON" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("40GiB", 40 * 2**30),
        ("40", 40 * 2**30),
        ("80 GB", 80 * 10**9),
        ("512MiB", 2**29),
        ("1.5g", int(1.5 * 2**30)),
        ("0", 0),
    ],
)
def test_parse_bytes(text, n):
    assert parse_bytes(text) == n


def test_format_bytes():
    assert format_bytes(40 * 2**30) == "40 GiB" and format_bytes(1536) == "1.5 KiB"


def test_plan_json_loads_as_a_plan(capsys):
    from planner import Plan

    out = run_json(capsys, "plan", "--model", "tiny", "--batch", "4", "--gpu-mem", "80MiB",
                   "--overhead", "0", "--no-fsdp", "--dtype", "fp32")  # fmt: skip
    assert "budget_source" in out
    plan = Plan.from_json(out)
    report = ("budget_source", "largest_batch_that_fits", "world_size_needed")
    assert json.loads(json.dumps(plan.to_json())) == {
        k: v for k, v in out.items() if k not in report
    }
    with pytest.raises(Exception, match="not an fsdpkit plan"):
        Plan.from_json({**out, "no_such_field": 1})


def test_verify_checks_the_plan_with_memtracker(capsys):
    from planner.oracle import memtracker_peak

    out = run_json(capsys, "plan", "--model", "toy_models:vit_spec", "--batch", "4",
                   "--gpu-mem", "700KiB", "--overhead", "0", "--no-fsdp", "--dtype", "fp32",
                   "--verify")  # fmt: skip
    v = out["verification"]
    assert v["tracker"] == "MemTracker" and v["time_s"] > 0
    assert v["peak_bytes"] == out["verified_peak_bytes"]
    assert out["fits"] == (max(out["peak_bytes"], v["peak_bytes"]) <= out["budget_bytes"])
    from fsdpkit import get_model_spec
    from planner import Plan

    spec = get_model_spec("toy_models:vit_spec")
    plan = Plan.from_json(out)
    measured = memtracker_peak(spec, 4, plan.segments, selective=plan.selective_spec)
    assert measured == v["peak_bytes"]


ANY_MODULE = ["--batch", "4", "--no-fsdp", "--dtype", "fp32", "--overhead", "0", "--gpu-mem", "1"]


@pytest.mark.parametrize(
    ("factory", "first", "blocks"),
    [
        ("vit_module", "vit.embeddings", 3),
        ("convnext_module", "convnext.embeddings", 4),
        ("regnet_module", "regnet.embedder", 6),
    ],
)
def test_plan_any_module_finds_units_and_matches_memtracker(factory, first, blocks, capsys):
    """No ModelSpec: a factory returning an nn.Module, an input shape, units found; the
    no-checkpointing prediction is within [0, +3%] of MemTracker."""
    from fsdpkit import get_model_spec
    from planner.oracle import memtracker_peak

    model = f"oracle_models:{factory}"
    out = run_json(capsys, "plan", "--model", model, "--input", "3x32x32", *ANY_MODULE)
    assert out["units"][0] == first and len(out["units"]) == blocks + 1
    spec = get_model_spec(model, input_shape=(3, 32, 32))
    measured = memtracker_peak(spec, 4, [(0, len(out["units"]), False)])
    assert measured <= out["peak_bytes_without_checkpointing"] <= measured * 1.03


def test_units_glob_overrides_discovery(capsys):
    out = run_json(capsys, "plan", "--model", "oracle_models:vit_module", "--input", "3x32x32",
                   "--units", "vit.layers.*", *ANY_MODULE)  # fmt: skip
    assert out["units"] == [f"vit.layers.{i}" for i in range(3)]


@pytest.mark.parametrize(("factory", "units"), [("convnext_tiny", 5), ("vit_base", 13)])
def test_the_readme_plans_transformers_models_in_one_command(factory, units, capsys, monkeypatch):
    """The README's commands, from the repository root: ConvNeXt-T and ViT-B/16 at 224 px,
    batch 8, default setup (FSDP, 8 ranks, fp16, 40 GiB), no ModelSpec written."""
    monkeypatch.chdir(Path(__file__).parents[1])
    out = run_json(capsys, "plan", "--model", f"examples.hf_vision:{factory}", "--input",
                   "3x224x224", "--batch", "8")  # fmt: skip
    assert len(out["units"]) == units and out["fits"]
    assert out["peak_bytes"] <= out["budget_bytes"]
