"""One description of the training setup: the planner reads the wrapper's policy, a plan
records the setup it was made for, and a run refuses a plan made for another."""

import json

import pytest

from fsdpkit import FsdpkitError, FSDPPolicy, get_model_spec
from fsdpkit.cli import main as fsdpkit_main
from planner import MemoryConfig, Plan, estimate, plan_checkpoints, profile_model
from seer_train.cli import main as seer_main

PRETRAIN = ["pretrain", "--model", "tiny", "--batch-size", "8", "--synthetic-images", "32",
            "--workers", "0", "--steps", "2", "--no-reslice"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_profile():
    return profile_model(get_model_spec("tiny"), 4, dtype="bf16")


def test_memory_config_reads_the_policy_the_wrapper_applies():
    policy = FSDPPolicy(param_dtype="bf16", reduce_dtype="bf16", prefetch=2,
                        reshard_after_forward=False, batchnorm="units")  # fmt: skip
    cfg = MemoryConfig.from_policy(policy, 16, optimizer="adamw")
    assert (cfg.world_size, cfg.sharded, cfg.optimizer) == (16, True, "adamw")
    assert (cfg.reduce_dtype, cfg.prefetch, cfg.reshard_after_forward, cfg.batchnorm) == (
        "bf16", 2, False, "units")  # fmt: skip
    # "auto" resolves as the wrapper does: FP16 cannot replicate (GradScaler)
    assert MemoryConfig.from_policy(FSDPPolicy(param_dtype="fp16"), 8).batchnorm == "units"


def test_resharding_and_batchnorm_mode_are_modelled(tiny_profile):
    prof, n = tiny_profile, len(tiny_profile.units)
    plain = [(0, n, False)]
    base = MemoryConfig(world_size=8, sharded=True)
    kept = MemoryConfig(world_size=8, sharded=True, reshard_after_forward=False)
    # kept gathered: at the last unit's backward every unit's parameters are whole (unit 4's
    # are being prefetched in the base case): units 0-3 in bf16, dim 0 padded to 8 rows
    at_kept = {label: total for label, total, _ in estimate(prof, plain, kept).timeline}
    at_base = {label: total for label, total, _ in estimate(prof, plain, base).timeline}
    gathered = sum(2 * 8 * -(-r // 8) * (m // r) for g in prof.shard_rows[:4] for r, m in g)
    assert at_kept["bwd 5"] - at_base["bwd 5"] == gathered > 0
    units = estimate(prof, plain, MemoryConfig(world_size=8, sharded=True, batchnorm="units"))
    rep = estimate(prof, plain, base)
    bn = prof.bn_param_numel
    assert bn > 0
    assert rep.breakdown["BatchNorm parameters, gradients, state (replicated fp32)"] == 4 * 3 * bn
    kept_bn = units.breakdown["BatchNorm (sharded fp32, gathered and kept)"]
    assert kept_bn == 4 * (2 + 1) * -(-bn // 8) + 4 * bn


def test_a_plan_records_its_setup_and_refuses_another(tiny_profile, tmp_path):
    policy = FSDPPolicy(param_dtype="bf16", prefetch=2)
    plan = plan_checkpoints(tiny_profile, 2**40, MemoryConfig.from_policy(policy, 8))
    plan.save(tmp_path / "p.json")
    back = Plan.load(tmp_path / "p.json")
    assert back == plan
    setup = back.setup()
    assert setup == {"model": "tiny", "batch_size": 4, "dtype": "bf16", "world_size": 8,
                     "sharded": True, "optimizer": "sgd", "weight_decay": True,
                     "reduce_dtype": "fp32", "prefetch": 2, "reshard_after_forward": True,
                     "batchnorm": "replicate"}  # fmt: skip
    back.check_setup(world_size=8, prefetch=2, dtype="bf16")  # the same: no error
    with pytest.raises(FsdpkitError) as e:
        back.check_setup("p.json", world_size=8, prefetch=1)
    msg = str(e.value)
    assert "\n" not in msg and "prefetch 2" in msg and "this run has 1" in msg
    # a plan written before setups were recorded is checked on what it has
    old = {k: v for k, v in plan.to_json().items() if k != "config"}
    Plan.from_json(old).check_setup(world_size=8, prefetch=1)


def test_a_plan_for_8_ranks_is_refused_on_one_and_a_matching_plan_trains(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert fsdpkit_main(["plan", "--model", "tiny", "--batch", "8", "--world-size", "8",
                         "--save", "p8.json", "--json"]) == 0  # fmt: skip
    assert seer_main([*PRETRAIN, "--plan", "p8.json", "--out", "r8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "world_size 8, this run has 1" in err, err
    assert fsdpkit_main(["plan", "--model", "tiny", "--batch", "8", "--world-size", "1",
                         "--dtype", "fp32", "--save", "p1.json", "--json"]) == 0  # fmt: skip
    capsys.readouterr()
    assert seer_main([*PRETRAIN, "--plan", "p1.json", "--out", "r1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["end_step"] == 2
    assert Plan.load("r1/plan.json") == Plan.load("p1.json")  # the run keeps the plan it used


def test_a_resumed_run_uses_its_own_plan(tmp_path, capsys):
    run = tmp_path / "run"
    argv = [*PRETRAIN, "--steps", "4", "--save-every", "2", "--out", str(run), "--json"]
    assert seer_main([*argv, "--stop-after", "2"]) == 0
    capsys.readouterr()
    # another valid plan for the same setup, as a user might have edited it
    data = json.loads((run / "plan.json").read_text())
    data["segments"] = [[0, 3, True], [3, 6, False]]
    (run / "plan.json").write_text(json.dumps(data))
    assert seer_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["start_step"] == 2 and out["plan_segments"] == [[0, 3, True], [3, 6, False]]


def test_parallelize_refuses_a_plan_made_for_another_setup(tiny_profile):
    from fsdpkit import parallelize

    policy = FSDPPolicy(param_dtype="bf16")
    plan = plan_checkpoints(tiny_profile, 2**40, MemoryConfig.from_policy(policy, 8))
    model = get_model_spec("tiny").build_model("meta")
    with pytest.raises(FsdpkitError, match=r"world_size 8, this run has 1"):
        parallelize(model, plan=plan, policy=policy)  # one process, no group: world size 1
    plan1 = plan_checkpoints(tiny_profile, 2**40, MemoryConfig.from_policy(policy, 1))
    with pytest.raises(FsdpkitError, match=r"prefetch 1, this run has 2"):
        parallelize(model, plan=plan1, policy=FSDPPolicy(param_dtype="bf16", prefetch=2))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: None, "cannot read plan"),  # no such file
        (lambda d: (d / "p.json").write_text("{not json"), "cannot read plan"),
        (lambda d: (d / "p.json").write_text("{}"), "not an fsdpkit plan"),
    ],
)
def test_a_bad_plan_file_is_one_line_and_exit_2(tmp_path, capsys, make, message):
    make(tmp_path)
    argv = [*PRETRAIN, "--plan", str(tmp_path / "p.json"), "--out", str(tmp_path / "run")]
    assert seer_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_policy_the_wrapper_refuses_is_refused_by_the_planner_too(capsys):
    argv = ["plan", "--model", "tiny", "--batch", "2", "--dtype", "fp16", "--batchnorm",
            "replicate"]  # fmt: skip
    assert fsdpkit_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot train in fp16" in err, err
