"""Process-group set-up for training: ``torchrun`` (any number of nodes) or one process.

Under ``torchrun`` the environment names the rendezvous (``MASTER_ADDR``/``MASTER_PORT``,
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); NCCL is used when CUDA is present, gloo otherwise.
Run as a plain process, a one-rank gloo group is created in memory, so the same sharded code
path (FSDP2 needs a process group) runs everywhere.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "Preemption", "distributed"]


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
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
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

    Ranks receive the signal at slightly different moments, so :meth:`requested` agrees on it
    with one MAX all-reduce of one element per step: every rank stops after the same step.
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
