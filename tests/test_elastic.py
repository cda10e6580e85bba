"""Failures at scale: a hung rank fails the job naming it; torchrun restarts resume bitwise."""

import random

import pytest
from elastic_fns import hang_run, same_checkpoint, slow_first_step, torchrun_with_kills

from fsdpkit.testing import DistributedTestError, run_distributed

ARGS = ["--model", "tiny", "--batch-size", "4", "--synthetic-images", "64", "--workers", "0",
        "--steps", "12", "--save-every", "2", "--keep-last", "2", "--no-reslice",
        "--json"]  # fmt: skip


@pytest.mark.dist
@pytest.mark.parametrize("how", ["sigstop", "sleep"])
def test_a_rank_that_stops_making_progress_fails_the_job_naming_it(tmp_path, capfd, how):
    # rank 1 stops after step 2 (SIGSTOP: frozen; sleep: alive, never reaching the collective
    # rank 0 waits in); the job ends instead of hanging. The timeout is about 10x a tiny step
    # on a loaded 2-core machine; the slower first step has the default 600 s.
    with pytest.raises(DistributedTestError, match="exited with code 3"):
        run_distributed(hang_run, 2, str(tmp_path / "run"), 8, 1, 2, how, 8.0, timeout_s=150)
    err = capfd.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("seer-train: error:")]
    assert len(lines) == 1, err
    assert "rank 1 is stuck at step 2" in lines[0] and "--collective-timeout 8" in lines[0]
    assert ("stopped or dead" in lines[0]) == (how == "sigstop"), lines[0]


@pytest.mark.dist
def test_the_first_step_has_its_own_deadline_and_later_steps_the_tight_one(capfd):
    # the first step outlasts the tight deadline 4x; only the second step's stall ends the job
    with pytest.raises(DistributedTestError, match="exited with code 3"):
        run_distributed(slow_first_step, 1, 120.0, 0.5, 2.0, timeout_s=100)
    lines = [x for x in capfd.readouterr().err.splitlines() if x.startswith("seer-train: error")]
    assert len(lines) == 1 and "rank 0 is stuck at step 2" in lines[0], lines
    assert "(--collective-timeout 0.5)" in lines[0], lines


@pytest.mark.dist
def test_torchrun_restarts_after_sigkills_and_the_run_ends_bitwise_as_if_uninterrupted(tmp_path):
    straight = torchrun_with_kills(ARGS, tmp_path / "straight", 0, random.Random(0))
    killed = torchrun_with_kills(ARGS, tmp_path / "killed", 2, random.Random(1))
    assert straight["returncode"] == 0, straight["stderr"]
    assert killed["returncode"] == 0 and killed["kills"] == 2, killed["stderr"]
    assert len(killed["lost"]) == 2 and all(0 <= n <= 2 for n in killed["lost"]), killed
    final = "checkpoints/step_00000012"
    assert same_checkpoint(tmp_path / "straight" / final, tmp_path / "killed" / final) == []
