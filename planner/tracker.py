"""Live tensor memory, tracked at the storage level by a dispatch mode.

Works the same on ``meta`` (symbolic: shapes only, nothing allocated) and on real devices: every
storage an op returns is counted once, from the op that created it until its last reference
dies (a weak-reference callback). Pre-existing tensors (parameters, inputs, optimizer state)
are counted with :meth:`LiveMemory.register`. Kernel-internal workspaces that never surface as
tensors are not seen; on CUDA, compare with the allocator's own statistics.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["LiveMemory", "storage_key", "tensor_storages"]


def tensor_storages(obj: Any) -> list[torch.UntypedStorage]:
    """The distinct storages of every tensor in a nested structure."""
    seen: dict[int, torch.UntypedStorage] = {}
    for t in tree_leaves(obj):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen.setdefault(storage_key(st), st)
    return list(seen.values())


def storage_key(st: torch.UntypedStorage) -> int:
    """Identity of a storage across Python wrappers (the C++ object's address)."""
    return st._cdata


class LiveMemory(TorchDispatchMode):
    """Counts bytes of live tensor storages; ``peak`` since creation, ``window_peak`` since
    :meth:`reset_window`. ``on_update(live_bytes)`` (optional) is called after every change,
    for timelines; ``on_op(func, args, kwargs, out, flops)`` (optional) after every operator,
    for per-operator costs. ``flops`` counts FLOPs of the ops run under it with the per-op
    formulas of ``torch.utils.flop_counter`` (as ``FlopCounterMode`` does, without decomposing
    the ops it does not count, which makes it several times faster)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.live = 0
        self.peak = 0
        self.window_peak = 0
        self.on_update = None
        self.on_op = None  # on_op(func, args, kwargs, out, flops): per-operator costs
        self._storages: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.created = 0  # storages counted so far: a serial for "made since"

    def register(self, tensors: Iterable[Any]) -> None:
        """Count storages that already exist (parameters, buffers, inputs, optimizer state)."""
        for st in tensor_storages(list(tensors)):
            self._add(st)

    def made_since(self, serial: int) -> list[torch.UntypedStorage]:
        """Live storages counted after the ``serial``-th (compare :attr:`created` earlier)."""
        return [st for st, (_, _, k) in list(self._storages.items()) if k > serial]

    def reset_window(self) -> int:
        self.window_peak = self.live
        return self.live

    def _changed(self) -> None:
        if self.live > self.peak:
            self.peak = self.live
        if self.live > self.window_peak:
            self.window_peak = self.live
        if self.on_update is not None:
            self.on_update(self.live)

    def _add(self, st: torch.UntypedStorage) -> None:
        if st in self._storages:
            return
        nbytes = st.nbytes()
        self.created += 1
        self._storages[st] = (nbytes, weakref.ref(st, self._freer(nbytes)), self.created)
        self.live += nbytes
        self._changed()

    def _freer(self, nbytes: int):
        def free(_ref: weakref.ref) -> None:
            self.live -= nbytes
            if self.on_update is not None:
                self.on_update(self.live)

        return free

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        flops = count(*args, **kwargs, out_val=out) if count is not None else 0
        self.flops += flops
        if self.on_op is not None:
            self.on_op(func, args, kwargs, out, flops)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())
        return out
