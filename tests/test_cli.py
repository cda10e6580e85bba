"""The ``fsdpkit`` command line: tables, JSON, and one-line errors with exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsdpkit.cli import main

TESTS = Path(__file__).parent


def test_models_json_has_parts_flops_and_architecture(capsys):
    assert main(["models", "--json", "tiny", "regnet10b"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    tiny, big = rows["tiny"], rows["regnet10b"]
    assert tiny["parameters"]["trunk"] == 104_274
    assert set(tiny["parameters"]) == {"trunk", "head", "prototypes", "total"}
    assert big["info"]["stage_widths"] == [2020, 4040, 11110, 28280]
    assert big["info"]["stage_depths"] == [2, 7, 17, 1]
    assert big["info"]["crops"] == "2×160+4×96"
    assert big["units"] == 28
    assert 9.3e9 < big["parameters"]["trunk"] < 9.4e9
    assert big["parameters"]["prototypes"] == 256 * 16000
    # The crop set has 2·160² + 4·96² = 88,064 pixels, 1.755× one 224 px image; heads add ~0.1%.
    ratio = big["flops_per_sample"] / (big["info"]["trunk_gflops_224px"] * 1e9)
    assert 1.74 < ratio < 1.78


def test_models_table_lists_every_registered_model(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "rg8gf", "rg16gf", "rg32gf", "rg64gf", "rg128gf", "rg256gf", "regnet10b"):
        assert name in out
    assert "2020/4040/11110/28280" in out and "prototypes" in out


def test_models_table_takes_user_models(capsys):
    assert main(["models", "toy_models:vit_spec"]) == 0
    out = capsys.readouterr().out
    assert "toy-vit" in out and "blocks" in out


@pytest.mark.parametrize("argv", [["models", "nope"], ["models", "tiny", "toy_models:nope"]])
def test_unknown_model_is_one_line_and_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fsdpkit: error: ") and err.count("\n") == 1


def test_console_script_exit_codes():
    script = Path(sys.executable).parent / "fsdpkit"
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    bad = subprocess.run([script, "models", "resnet50"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "known models: regnet10b" in bad.stderr
    usage = subprocess.run([script, "frobnicate"], capture_output=True, text=True, env=env)
    assert usage.returncode == 2
    ok = subprocess.run([script, "models", "--json", "tiny"], capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)[0]["name"] == "tiny"
