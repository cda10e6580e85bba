"""Module-level functions that the distributed tests run on every rank (spawn imports them)."""

import os
import threading
import time

import torch
import torch.distributed as dist


def all_reduce_rank() -> tuple[int, int, float]:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


def env_and_threads() -> tuple[str, str, int]:
    return os.environ["RANK"], os.environ["WORLD_SIZE"], torch.get_num_threads()


def raise_on_rank(bad_rank: int) -> int:
    if dist.get_rank() == bad_rank:
        raise ValueError(f"rank {bad_rank} is unhappy")
    dist.barrier()  # the others wait in a collective that never completes
    return 0


def exit_on_rank_zero() -> int:
    if dist.get_rank() == 0:
        os._exit(3)
    dist.barrier()
    return 0


def sleep_forever(pid_dir: str) -> None:
    with open(os.path.join(pid_dir, f"{dist.get_rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(3600)


def write_both() -> None:
    import sys

    print(f"rank {dist.get_rank()} out", flush=True)
    print(f"rank {dist.get_rank()} err", file=sys.stderr, flush=True)


SHARED_LOCK = threading.Lock()


def take_shared_lock() -> bool:
    return SHARED_LOCK.acquire(timeout=10)


def unpicklable_result():
    return lambda: None


def count_collectives():
    from torch.distributed.fsdp import fully_shard

    from fsdpkit import CommCounter

    m = torch.nn.Linear(4, 3)
    fully_shard(m)
    with CommCounter() as c:
        t = torch.ones(5)
        dist.all_reduce(t)
        out = torch.empty(5 * dist.get_world_size())
        dist.all_gather_into_tensor(out, t)
        dist.reduce_scatter_tensor(torch.empty(5), out)
        m.weight.full_tensor()  # DTensor: a functional all-gather (padded to 2 rows per rank)
    return dict(c.counts), dict(c.bytes)


def collect_garbage() -> int:
    """Run the cyclic garbage collector in this rank; returns what it found."""
    import gc

    return int(gc.collect() >= 0)
