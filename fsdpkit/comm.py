"""Count collectives and the bytes they move, by kind, with a dispatch mode.

Every ``torch.distributed`` collective runs as an operator through the dispatcher (``c10d``
for ``dist.all_reduce`` and FSDP2's all-gathers and reduce-scatters, ``_c10d_functional`` for
DTensor redistributions such as ``full_tensor()``), so a :class:`TorchDispatchMode` sees each
call with its tensors::

    with CommCounter() as comm:
        optimizer.step()
    comm.counts["all_reduce"], comm.numel["all_reduce"]

Bytes are the tensor payload of the call on this rank (the output buffer for all-gathers, the
input for reduce-scatters, the tensor for all-reduce/broadcast), not what the network carries.

``exposed_s`` is communication time the calling thread could not hide: the time spent issuing
collectives plus the time blocked waiting for them (``Work.wait``, timed through
:func:`._torch_private.time_work_waits` as no public hook sees it, and functional
``wait_tensor``). Collectives that complete while the thread computes (prefetched all-gathers)
cost nothing here.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import ExitStack
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ._torch_private import time_work_waits

__all__ = ["CommCounter"]

# Operator name (without overload) → (kind, where the payload is): an argument index, "out"
# for the returned tensor, or None. c10d ops are what ``dist.*`` and FSDP2 call; the
# ``_c10d_functional`` ops are what DTensor and functional collectives call. Other ops in those
# namespaces (wait_tensor, _wrap_tensor_autograd, ...) move nothing and are not counted.
_KINDS: dict[str, tuple[str, int | str | None]] = {
    "allreduce_": ("all_reduce", 0),
    "allreduce_coalesced_": ("all_reduce", 0),
    "all_reduce": ("all_reduce", 0),
    "all_reduce_": ("all_reduce", 0),
    "all_reduce_coalesced": ("all_reduce", 0),
    "_allgather_base_": ("all_gather", 0),
    "allgather_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "all_gather_into_tensor": ("all_gather", "out"),
    "all_gather_into_tensor_coalesced": ("all_gather", "out"),
    "_reduce_scatter_base_": ("reduce_scatter", 1),
    "reduce_scatter_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "reduce_scatter_tensor": ("reduce_scatter", 0),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", 0),
    "broadcast_": ("broadcast", 0),
    "broadcast": ("broadcast", 0),
    "alltoall_base_": ("all_to_all", 0),
    "alltoall_": ("all_to_all", 0),
    "all_to_all_single": ("all_to_all", 0),
    "send": ("send", 0),
    "recv_": ("recv", 0),
    "barrier": ("barrier", None),
}
_NAMESPACES = {"c10d", "_c10d_functional", "_c10d_functional_autograd"}


class CommCounter(TorchDispatchMode):
    """``counts[kind]`` calls, ``numel[kind]`` elements and ``bytes[kind]`` payload bytes;
    ``calls`` lists ``(kind, operator, numel, bytes)`` in order."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.numel: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.calls: list[tuple[str, str, int, int]] = []
        self.exposed_s = 0.0
        self._waits: ExitStack | None = None

    def _add_wait(self, seconds: float) -> None:
        self.exposed_s += seconds

    def __enter__(self):
        # Work.wait is where a thread blocks on an asynchronous collective: time it.
        self._waits = ExitStack()
        self._waits.enter_context(time_work_waits(self._add_wait))
        try:
            return super().__enter__()
        except BaseException:
            self._waits.close()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._waits.close()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        timed = func.namespace in _NAMESPACES
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        if timed:
            self.exposed_s += time.perf_counter() - t0
        if func.namespace in _NAMESPACES and func._opname in _KINDS:
            kind, where = _KINDS[func._opname]
            if where == "out":
                payload = out
            elif isinstance(where, int) and where < len(args):
                payload = args[where]
            else:
                payload = []
            tensors = [t for t in tree_leaves(payload) if isinstance(t, torch.Tensor)]
            numel = sum(t.numel() for t in tensors)
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            self.counts[kind] += 1
            self.numel[kind] += numel
            self.bytes[kind] += nbytes
            self.calls.append((kind, func._opname, numel, nbytes))
        return out

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: {"calls": self.counts[k], "bytes": self.bytes[k]} for k in sorted(self.counts)
        }
        out["exposed_s"] = self.exposed_s
        return out
