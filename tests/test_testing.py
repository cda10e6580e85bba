"""The multi-process harness every distributed test goes through."""

import os

import pytest
from dist_fns import (
    all_reduce_rank,
    collect_garbage,
    env_and_threads,
    exit_on_rank_zero,
    raise_on_rank,
    sleep_forever,
    take_shared_lock,
    unpicklable_result,
    write_both,
)

from fsdpkit.testing import DistributedTestError, RemoteTraceback, run_distributed

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_results_come_back_in_rank_order(world_size):
    expected = float(sum(range(world_size)))
    assert run_distributed(all_reduce_rank, world_size) == [
        (r, world_size, expected) for r in range(world_size)
    ]


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_start_methods_and_rank_environment(method):
    out = run_distributed(env_and_threads, 2, start_method=method, threads_per_rank=1)
    assert out == [("0", "2", 1), ("1", "2", 1)]


def test_fork_with_several_threads_is_refused_or_spawns(monkeypatch):
    with pytest.raises(ValueError, match="threads_per_rank=1"):
        run_distributed(env_and_threads, 1, start_method="fork", threads_per_rank=2)
    monkeypatch.setenv("FSDPKIT_TEST_START_METHOD", "fork")  # a default, not a demand: spawn
    assert run_distributed(env_and_threads, 1, threads_per_rank=2) == [("0", "1", 2)]
    # the fork server never ran a parallel region: several threads are fine there
    out = run_distributed(env_and_threads, 1, start_method="forkserver", threads_per_rank=2)
    assert out == [("0", "1", 2)]


def test_forkserver_ranks_do_not_inherit_the_callers_locks():
    # A lock some thread of the caller holds (here: the caller itself) is held forever in a
    # plainly forked child; ranks forked from the server import a fresh one.
    import dist_fns

    with dist_fns.SHARED_LOCK:
        out = run_distributed(take_shared_lock, 2, start_method="forkserver", timeout_s=60)
    assert out == [True, True]


def test_fork_does_not_inherit_a_parents_garbage_process_group():
    # An in-process test may leave a gloo group in a reference cycle (a traceback holding its
    # frame). Destroyed by a forked rank's collector, it joins threads fork did not copy:
    # that hung the suite under pytest-xdist until the harness collected it before forking.
    import gc

    import torch.distributed as dist

    gc.disable()  # keep the cycle for the fork, as a busy parent's collector would
    try:
        pg = dist.ProcessGroupGloo(dist.HashStore(), 0, 1)
        cycle: list = [pg]
        cycle.append(cycle)
        del pg, cycle
        assert run_distributed(collect_garbage, 2, start_method="fork", timeout_s=60) == [1, 1]
    finally:
        gc.enable()


def test_rank_exception_is_reraised_with_its_traceback():
    with pytest.raises(ValueError, match="rank 1 is unhappy") as info:
        run_distributed(raise_on_rank, 3, 1, timeout_s=60)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "rank 1 traceback" in str(cause) and "raise_on_rank" in str(cause)


def test_rank_dying_without_exception_is_reported():
    with pytest.raises(DistributedTestError, match="exited with code 3"):
        run_distributed(exit_on_rank_zero, 2, timeout_s=60)


def test_timeout_kills_every_rank(tmp_path):
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] still running"):
        run_distributed(sleep_forever, 2, str(tmp_path), timeout_s=8)
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_unpicklable_result_is_an_error():
    with pytest.raises(Exception, match=r"pickle|Can't"):
        run_distributed(unpicklable_result, 1)


def test_bad_world_size():
    with pytest.raises(ValueError, match="world_size"):
        run_distributed(all_reduce_rank, 0)


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_ranks_write_where_the_caller_writes_now(method, capfd):
    # A fork server's descriptors are those of the moment it started (an earlier test's
    # capture, under pytest): each rank gets the caller's current stdout and stderr instead.
    run_distributed(write_both, 2, start_method=method)
    out, err = capfd.readouterr()
    assert "rank 0 out" in out and "rank 1 out" in out
    assert "rank 0 err" in err and "rank 1 err" in err
