"""Process-group set-up for training: ``torchrun`` (any number of nodes) or one process.

Under ``torchrun`` the environment names the rendezvous (``MASTER_ADDR``/``MASTER_PORT``,
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); NCCL is used when CUDA is present, gloo otherwise.
Run as a plain process, a one-rank gloo group is created in memory, so the same sharded code
path (FSDP2 needs a process group) runs everywhere.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "Preemption", "Watchdog", "distributed"]


@dataclass(frozen=True, slots=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


@contextmanager
def distributed() -> Iterator[DistContext]:
    """Join (or create) the default process group; leave it on exit if this call made it."""
    created = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            # torchrun may keep its store across restarts of the group: keys of the group
            # that died (its ranks' addresses) must not be read by the new one.
            store, rank, world = next(dist.rendezvous("env://"))
            store = dist.PrefixStore(f"seer/{os.environ['TORCHELASTIC_RESTART_COUNT']}/", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
        elif "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        created = True
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    try:
        yield DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)
    finally:
        if created:
            dist.destroy_process_group()


class Preemption:
    """SIGTERM (a scheduler's preemption, ``torchrun`` shutting down) asks for a checkpoint.

    Ranks receive the signal at slightly different moments: ``flag`` is this rank's vote,
    which the training step agrees on in the all-reduce it runs anyway (``train_step``'s
    ``votes``), so every rank stops after the same step; :meth:`requested` is a stand-alone
    agreement (one MAX all-reduce of one element) for loops without that step.
    """

    def __init__(self) -> None:
        self.flag = False
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, _signum, _frame) -> None:
        self.flag = True

    def requested(self, device: torch.device) -> bool:
        t = torch.tensor([float(self.flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class Watchdog:
    """Turns a hang into a failure: if this rank's training loop makes no progress for
    ``timeout_s`` seconds, the job stops with one line naming the rank that is stuck.

    The loop calls :meth:`beat` at every step (and around long phases such as saves). A thread
    publishes ``(step, phase, counter)`` to the job's rendezvous store at once when the step
    changes and otherwise every ``timeout_s / 6`` seconds; the counter advances while the
    process runs, so a stopped or dead rank (SIGSTOP, a lost node) shows a frozen counter, and a
    rank that is alive but has not reached the collective its peers wait in shows the lowest
    step. When the deadline passes, the first rank to notice prints ``seer-train: error: rank R
    is stuck at step S (why): no progress for T s ...`` on stderr and every rank that notices
    exits with status 3 (under ``torchrun --max-restarts`` the agent then restarts the group,
    which resumes from the newest complete checkpoint).

    The run's first step (lazy initialisation, the first all-gathers, compilation, a resumed
    run's first reads) is held to ``first_step_timeout_s`` instead, when that is longer, so a
    tight ``timeout_s`` bounds the steady state without failing a slow start (torchtitan
    separates its init and train timeouts for the same reason).

    Cost: one store write per rank per step, at most every ``timeout_s / 24`` s, and one every
    ``timeout_s / 6`` s while a step lasts longer, from a background thread.
    """

    EXIT_CODE = 3

    def __init__(
        self,
        timeout_s: float,
        rank: int,
        world_size: int,
        prefix: str = "",
        first_step_timeout_s: float | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.first_step_timeout_s = max(first_step_timeout_s or 0.0, timeout_s)
        self.rank, self.world = rank, world_size
        self._store = dist.PrefixStore(
            f"watchdog{prefix}/", dist.distributed_c10d._get_default_store()
        )
        self._progress = (0, "start", time.monotonic())  # (step, phase, when)
        self._first: int | None = None  # the first step this run computes
        self._stop = threading.Event()
        self._news = threading.Event()  # a new step to publish now
        self._seen: dict[int, tuple[str, float, bool]] = {}
        self._thread = threading.Thread(target=self._run, name="seer-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int, phase: str = "step") -> None:
        """This rank is alive and at ``step`` (1-based, the step being computed) in ``phase``."""
        if self._first is None:
            self._first = step
        news = step != self._progress[0]
        self._progress = (step, phase, time.monotonic())
        if news:
            self._news.set()

    def close(self) -> None:
        self._stop.set()
        self._news.set()
        self._thread.join()

    def _limit(self, step: int) -> tuple[float, str]:
        """The deadline that applies at ``step`` and the flag that sets it."""
        first = self._first is None or step == self._first
        if first and self.first_step_timeout_s > self.timeout_s:
            return self.first_step_timeout_s, "--first-step-timeout"
        return self.timeout_s, "--collective-timeout"

    def _run(self) -> None:
        interval = max(self.timeout_s / 6, 0.05)
        counter = 0
        while True:
            self._news.clear()  # before reading progress: a beat from here on wakes the wait
            step, phase, since = self._progress
            limit, flag = self._limit(step)
            counter += 1
            try:
                self._store.set(str(self.rank), f"{step} {phase} {counter}")
                stalled = time.monotonic() - since
                if stalled > limit / 2:  # start watching the peers' heartbeats
                    self._observe()
                else:
                    self._seen.clear()
            except Exception:  # the store is gone: the agent is tearing the job down
                return
            if stalled > limit and not self._stop.is_set():
                self._fail(step, stalled, interval, limit, flag)
            # at most 4 writes per interval on news (fast steps), else one per interval
            if self._stop.wait(interval / 4):
                return
            self._news.wait(interval * 3 / 4)
            if self._stop.is_set():
                return

    def _observe(self) -> None:
        now = time.monotonic()
        for r in range(self.world):
            beat = self._store.get(str(r)).decode() if self._store.check([str(r)]) else "0 - -1"
            if r not in self._seen:
                self._seen[r] = (beat, now, True)  # (heartbeat, first seen, unchanged since)
            elif self._seen[r][0] != beat:
                self._seen[r] = (beat, self._seen[r][1], False)

    def _fail(self, step: int, stalled: float, interval: float, limit: float, flag: str) -> None:
        try:
            culprit = self._culprit(interval)
            first = self._store.add("reported", 1) == 1
        except Exception:
            culprit, first = f"rank {self.rank} is stuck at step {step} (peers unknown)", True
        if first:
            print(
                f"seer-train: error: {culprit}: no progress for {stalled:.0f} s "
                f"({flag} {limit:g}); stopping the job",
                file=sys.stderr,
                flush=True,
            )
        os._exit(self.EXIT_CODE)  # peers are blocked in collectives: no clean shutdown exists

    def _culprit(self, interval: float) -> str:
        """Which rank holds the job: one whose heartbeat froze (stopped or dead), else the one
        at the lowest step (alive, but not at the collective the others wait in)."""
        now = time.monotonic()
        frozen = [
            r
            for r, (_, first, unchanged) in self._seen.items()
            if unchanged and now - first >= 2 * interval and r != self.rank
        ]
        beats = {r: b.split() for r, (b, *_) in self._seen.items()}
        steps = {r: int(b[0]) for r, b in beats.items()}
        if frozen:
            r, how = frozen[0], "its process is stopped or dead"
        else:
            r = min(steps, key=lambda k: (steps[k], k))
            if steps[r] == steps[self.rank]:
                r = self.rank  # every rank at the same step: name the one that noticed
            how = f"in {beats[r][1]}, alive but not reaching its peers' collective"
        return f"rank {r} is stuck at step {steps[r]} ({how})"
