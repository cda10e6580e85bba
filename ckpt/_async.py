"""Background checkpoint writes: one save in flight per process, on a process group of its own.

A staged save (host copies of a rank's shards, taken on the training thread) is written by a
thread. Its collectives (the barriers and the gather of per-rank indexes) run on a gloo group
created once for the job, never on the default group: two threads issuing collectives on one
group could interleave them differently on different ranks. The group spans the whole world
because it only coordinates (barriers, the index gather, rank 0's publish); which rank writes
which rows was decided when staging, from each tensor's own mesh (``_format.local_rows``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

__all__ = ["AsyncSave", "side_group", "wait_for_saves"]

# Per-process resources, not configuration: the save in flight and the side group (made
# once per default process group, by every rank at the same save).
_in_flight: list[AsyncSave] = []
_groups: dict[int, tuple[object, dist.ProcessGroup]] = {}


class AsyncSave:
    """A checkpoint being written in the background. ``wait()`` blocks until it is published
    and returns its path (or raises the writer's error); ``done()`` does not block."""

    def __init__(self, path: Path, write: Callable[[], Path]) -> None:
        self.path = path
        self._error: BaseException | None = None
        # Not a daemon: an interpreter that exits normally finishes the save first.
        self._thread = threading.Thread(target=self._run, args=(write,), name="ckpt-save")

    @classmethod
    def start(cls, path: Path, write: Callable[[], Path]) -> AsyncSave:
        save = cls(path, write)
        _in_flight.append(save)
        save._thread.start()
        return save

    def _run(self, write: Callable[[], Path]) -> None:
        try:
            write()
        except BaseException as e:  # handed to whoever waits
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> Path:
        self._thread.join()
        if self in _in_flight:
            _in_flight.remove(self)
        if self._error is not None:
            raise self._error
        return self.path


def wait_for_saves() -> None:
    """Block until this process's background save (if any) is published; raise its error."""
    while _in_flight:
        _in_flight[0].wait()


def side_group() -> dist.ProcessGroup:
    """The job's gloo group for background saves (a collective call: every rank, same order)."""
    world = dist.distributed_c10d._get_default_group()
    cached = _groups.get(id(world))
    if cached is None or cached[0] is not world:
        cached = (world, dist.new_group(backend="gloo"))
        _groups[id(world)] = cached
    return cached[1]
