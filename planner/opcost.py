"""Per-operator costs of a profiled step: roofline time per named device, and what op-level
selective checkpointing would keep and recompute in each unit.

:class:`OpCosts` listens to :class:`~planner.tracker.LiveMemory` (``on_op``) during the
profiled step. Each operator's bytes moved are its tensor arguments' bytes plus its outputs'
(views move nothing); its time on each device in :data:`planner.devices.GPUS` is the roofline
of :func:`planner.devices.roofline_seconds`. Per unit, in forward: the outputs of the kept
operators (:func:`kitcore.selective.is_kept_op`), which selective checkpointing holds until
backward, and the FLOPs and time of the rest, which it runs again there; and whether its
code mutates a kept output in place in a way recomputation would repeat (``unsafe``: the unit
is then not offered selective checkpointing, see :data:`kitcore.selective.IDEMPOTENT_INPLACE`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from kitcore.selective import IDEMPOTENT_INPLACE, is_kept_op, mutates_first, op_intensity

from .devices import GPUS, roofline_seconds
from .tracker import storage_key

__all__ = ["OpCosts"]


@dataclass(slots=True)
class _KeptCall:
    """One call of a kept operator in a unit's forward."""

    intensity: float  # FLOPs per byte of output (kitcore.selective.op_intensity)
    flops: int
    times: dict[str, float]  # roofline seconds per device
    alive: dict[int, int] = field(default_factory=dict)  # storages it made: key -> bytes
    died: int = 0  # bytes of those that died in the forward (the cache holds them)


def _bytes(obj: Any) -> int:
    return sum(t.nbytes for t in tree_leaves(obj) if isinstance(t, torch.Tensor))


class OpCosts:
    """Costs of one step's operators, by unit. ``unit()`` says which unit's forward is running
    (an index) or None (work outside the units' forwards, and every backward)."""

    def __init__(self, n: int, dtype: str, unit: Callable[[], int | None], excluded: set[int]):
        self.dtype, self.unit, self.excluded = dtype, unit, excluded
        self._devices = list(GPUS.items())
        self.step_time = dict.fromkeys(GPUS, 0.0)
        self.fwd_time = [dict.fromkeys(GPUS, 0.0) for _ in range(n)]
        self.sel_time = [dict.fromkeys(GPUS, 0.0) for _ in range(n)]
        self.sel_flops = [0] * n
        # Kept outputs alive when the forward ends (storage key -> bytes); those that died in
        # it move to their call's ``died`` (the plain step keeps them for nothing; the cache
        # holds them to backward). Keys of dead storages are reused by later ones: never mixed.
        self.kept: list[dict[int, int]] = [{} for _ in range(n)]
        self.forward_done = False
        self._refs: list[weakref.ref] = []
        self.unsafe = [False] * n  # a kept output mutated in place by a non-idempotent op
        # per unit, its kept operator calls: what a threshold on intensity
        # (kitcore.selective.keeps) keeps and recomputes
        self.kept_calls: list[list[_KeptCall]] = [[] for _ in range(n)]

    def __call__(self, func, args, kwargs, out, flops: int) -> None:
        if func.is_view:
            return  # an alias: no data moves
        moved = _bytes((args, kwargs)) + _bytes(out)
        times = [(k, roofline_seconds(flops, moved, d, self.dtype)) for k, d in self._devices]
        step_time = self.step_time
        for k, t in times:
            step_time[k] += t
        i = self.unit()
        if i is None:
            return
        fwd = self.fwd_time[i]
        for k, t in times:
            fwd[k] += t
        if (
            mutates_first(func)
            and isinstance(args[0], torch.Tensor)
            and storage_key(args[0].untyped_storage()) in self.kept[i]
            and func.overloadpacket.__name__ not in IDEMPOTENT_INPLACE
        ):
            self.unsafe[i] = True
        if is_kept_op(func):
            call = _KeptCall(op_intensity(func, args, kwargs, out), flops, dict(times))
            self.kept_calls[i].append(call)
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    key = storage_key(st)
                    if key not in self.excluded and key not in self.kept[i]:
                        self.kept[i][key] = call.alive[key] = st.nbytes()
                        self._refs.append(weakref.ref(st, self._died(i, key, call)))
        else:
            self.sel_flops[i] += flops
            sel = self.sel_time[i]
            for k, t in times:
                sel[k] += t

    def finish_forward(self) -> None:
        """The forward is over: storages that die from now on were kept to backward."""
        self.forward_done = True

    def _died(self, i: int, key: int, call: _KeptCall):
        def died(_ref: weakref.ref) -> None:
            if not self.forward_done and key in self.kept[i]:
                del self.kept[i][key]
                call.died += call.alive.pop(key)

        return died

    def intensities(self, i: int) -> list[tuple[float, int]]:
        """Unit ``i``'s kept calls as (FLOPs per output byte, bytes they keep), ascending."""
        return sorted((c.intensity, sum(c.alive.values()) + c.died) for c in self.kept_calls[i])

    def threshold(self, i: int, min_intensity: float) -> tuple[dict[int, int], int, int, dict]:
        """Under threshold ``min_intensity``: the kept storages alive at the forward's end,
        the kept bytes that died in it, and the FLOPs and time per device recomputed."""
        kept, dead = {}, 0
        flops, time = self.sel_flops[i], dict(self.sel_time[i])
        for c in self.kept_calls[i]:
            if c.intensity >= min_intensity:
                kept.update(c.alive)
                dead += c.died
            else:
                flops += c.flops
                for k, t in c.times.items():
                    time[k] += t
        return kept, dead, flops, time
