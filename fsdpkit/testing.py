"""Run a function on N processes joined in a ``torch.distributed`` group over loopback.

One helper for every multi-process test (ours, and those of projects that build on fsdpkit)::

    def check_allreduce():            # module level: spawned ranks import it by name
        t = torch.ones(1)
        dist.all_reduce(t)
        return t.item()

    assert run_distributed(check_allreduce, world_size=3) == [3.0, 3.0, 3.0]

What it takes care of: the rendezvous store listens on a free port chosen by the OS (no port
race); each rank gets one intra-op thread (4 ranks on 2 cores must not oversubscribe); an
exception on any rank is re-raised in the caller with the rank's traceback attached; the
remaining ranks are killed after a short grace period instead of hanging in a collective; a
per-call timeout kills every rank; ranks pass a barrier before ``destroy_process_group`` (gloo
can abort a process at teardown otherwise); children die with their parent (Linux
``PR_SET_PDEATHSIG``); no process outlives the call.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistributedTestError", "RemoteTraceback", "run_distributed"]

# What the fork server imports once, so that each rank forked from it starts in ~0.1 s.
_FORKSERVER_PRELOAD = ("torch", "torch.distributed", "torch.distributed.fsdp", __name__)
_GRACE_S = 3.0  # after one rank fails, how long the others get to report their own errors


class RemoteTraceback(Exception):
    """Carries a rank's formatted traceback; set as ``__cause__`` of the re-raised error."""

    def __str__(self) -> str:
        return str(self.args[0])


class DistributedTestError(RuntimeError):
    """A rank failed in a way that has no exception of its own (crash, timeout, bad pickle)."""


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _worker(
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    threads: int,
    results: mp.Queue,
    frozen: bool = False,
    outputs: tuple[Any, Any] | None = None,
) -> None:
    _die_with_parent()
    if frozen:
        gc.freeze()  # inherited by fork: never collected (and destroyed) in this process
    if outputs is not None:  # write where the caller's stdout/stderr go now (e.g. pytest's)
        for target, fd in zip((1, 2), outputs, strict=True):
            os.dup2(fd.detach(), target)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
        payload = pickle.dumps(fn(*args, **kwargs))
    except BaseException as e:  # report everything, including SystemExit from a test helper
        tb = "".join(traceback.format_exception(e))
        try:
            exc = pickle.dumps(e)
            pickle.loads(exc)
        except Exception:
            exc = None
        results.put((rank, False, (tb, exc)))
        results.close()
        results.join_thread()
        os._exit(1)  # no teardown: peers may be blocked in a collective with this rank
    results.put((rank, True, payload))
    dist.barrier()
    dist.destroy_process_group()


class _CallerFd:
    """The caller's file descriptor ``fd`` as it is when a rank is started, handed to a rank
    that does not inherit it (spawn, forkserver: the server's descriptors are those of the
    moment it started)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction

        return (_identity, (reduction.DupFd(self.fd),))


def _identity(x: Any) -> Any:
    return x


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "?"


def _raise_failure(failures: dict[int, tuple[str, bytes | None]], crashed: set[int]) -> None:
    # Root cause first: a rank that died without reporting (its peers' errors are consequences),
    # else the earliest report (``failures`` keeps arrival order).
    rank = min(crashed) if crashed else next(iter(failures))
    tb, exc = failures[rank]
    also = "".join(
        f"\nrank {r} also failed: {_last_line(failures[r][0])}"
        for r in sorted(set(failures) - {rank})
    )
    remote = RemoteTraceback(f'\n"""\nrank {rank} traceback:\n{tb}"""{also}')
    if exc is not None:
        raise pickle.loads(exc) from remote
    raise DistributedTestError(f"rank {rank}: {_last_line(tb)}{also}") from remote


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    backend: str = "gloo",
    threads_per_rank: int = 1,
    start_method: str | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return the results in rank order.

    ``fn`` and its arguments must be picklable (a module-level function) because ranks are
    started with ``spawn`` by default. ``start_method`` (or the environment variable
    ``FSDPKIT_TEST_START_METHOD``) picks another: ``"forkserver"`` forks each rank from a
    clean single-threaded server that imported torch once (a fast start that inherits nothing
    from the caller: use it in test suites); ``"fork"`` forks the caller itself, with one
    intra-op thread per rank (calls asking for more threads spawn: OpenMP does not survive
    fork), and a rank can hang on any lock another of the caller's threads held at that
    moment (a TCPStore server, a background save, a gloo worker).
    Inside ``fn`` the default process group is initialised; ``RANK``/``WORLD_SIZE`` are set in
    the environment.

    Raises the root-cause rank's own exception (its traceback chained as
    :class:`RemoteTraceback`; a rank that died without an exception is taken as the root cause,
    else the earliest report), :class:`DistributedTestError` when it has none, and
    :class:`TimeoutError` naming the ranks still running after ``timeout_s`` seconds.
    ``timeout_s`` is a hang guard, not a performance limit: keep it at least 5× what the call
    takes on a loaded machine (the default, 300 s, covers every call of fsdpkit's own suite).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    method = start_method or os.environ.get("FSDPKIT_TEST_START_METHOD", "spawn")
    if method == "fork" and threads_per_rank > 1:
        # GNU OpenMP's thread pool does not survive fork: a forked child whose parent already
        # ran parallel regions deadlocks in its first one with more than one thread.
        if start_method == "fork":
            raise ValueError("start_method='fork' needs threads_per_rank=1 (OpenMP and fork)")
        method = "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        # Only takes effect when the server starts (the first forkserver call in a process).
        ctx.set_forkserver_preload(list(_FORKSERVER_PRELOAD))
    if method == "fork":
        # A forked child inherits the parent's garbage, e.g. a gloo process group of an earlier
        # in-process test kept alive by a reference cycle; collected in the child, its
        # destructor joins worker threads that fork did not copy and hangs. Collect it here,
        # and the child freezes what it inherited (``_worker``).
        gc.collect()
    # The parent hosts the rendezvous store on an OS-chosen port: nothing can take it from us.
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    results: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(
                fn,
                args,
                kwargs,
                rank,
                world_size,
                store.port,
                backend,
                timeout_s,
                threads_per_rank,
                results,
                method == "fork",
                None if method == "fork" else (_CallerFd(1), _CallerFd(2)),
            ),
            name=f"rank{rank}",
        )
        for rank in range(world_size)
    ]
    try:
        for p in procs:
            p.start()
        return _collect(procs, results, timeout_s)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            if p.pid is not None:
                p.join(timeout=10)
        results.close()
        results.join_thread()
        del store


def _collect(procs: list[mp.Process], results: mp.Queue, timeout_s: float) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    done: dict[int, bytes] = {}
    failures: dict[int, tuple[str, bytes | None]] = {}
    crashed: set[int] = set()
    failed_at: float | None = None

    def pending() -> list[int]:
        return [r for r in range(len(procs)) if r not in done and r not in failures]

    def record(rank: int, ok: bool, payload: Any) -> None:
        (done if ok else failures)[rank] = payload

    while pending():
        now = time.monotonic()
        if failed_at is not None and now - failed_at > _GRACE_S:
            break  # the rest are presumably stuck in a collective with a failed rank
        if now > deadline:
            raise TimeoutError(f"ranks {pending()} still running after {timeout_s:g} s; killed")
        try:
            record(*results.get(timeout=0.05))
        except queue.Empty:
            dead = [r for r in pending() if procs[r].exitcode is not None]
            if dead:  # a report may still be in flight from a rank that just exited
                try:
                    while True:
                        record(*results.get(timeout=0.5))
                except queue.Empty:
                    pass
                for r in set(dead) & set(pending()):
                    failures[r] = (f"exited with code {procs[r].exitcode} without a result", None)
                    crashed.add(r)
        if failures and failed_at is None:
            failed_at = time.monotonic()
    if failures:
        _raise_failure(failures, crashed)
    for rank, p in enumerate(procs):  # every rank returned; teardown must be clean too
        p.join(timeout=max(1.0, deadline - time.monotonic()))
        if p.exitcode != 0:
            raise DistributedTestError(
                f"rank {rank} returned but exited with code {p.exitcode} during teardown"
            )
    return [pickle.loads(done[r]) for r in range(len(procs))]
