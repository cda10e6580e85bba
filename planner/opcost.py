"""Per-operator costs of a profiled step: roofline time per named device, and what op-level
selective checkpointing would keep and recompute in each unit.

:class:`OpCosts` listens to :class:`~planner.tracker.LiveMemory` (``on_op``) during the
profiled step. Each operator's bytes moved are its tensor arguments' bytes plus its outputs'
(views move nothing); its time on each device in :data:`planner.devices.GPUS` is the roofline
of :func:`planner.devices.roofline_seconds`. Per unit, in forward: every call whose output a
selective rule may keep (:func:`kitcore.selective.is_candidate`), with its score, the bytes
the cache would hold to backward and what recomputing it costs; the FLOPs and time of the
rest, which selective checkpointing always runs again; and which candidates' outputs its code
mutates in place in a way recomputation would repeat (a rule that keeps one of those is not
offered, see :data:`kitcore.selective.IDEMPOTENT_INPLACE`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from kitcore.selective import (
    IDEMPOTENT_INPLACE,
    is_candidate,
    is_kept_op,
    mutates_first,
    roofline_score,
)

from .devices import GPUS, roofline_seconds
from .tracker import storage_key

__all__ = ["OpCosts"]


@dataclass(slots=True)
class _Call:
    """One call in a unit's forward whose output a selective rule may keep."""

    score: float  # kitcore.selective.op_score: FLOPs per byte of output
    base: bool  # a kept operator (kitcore.selective.is_kept_op): kept at threshold 0
    flops: int
    times: dict[str, float]  # roofline seconds per device
    alive: dict[int, int] = field(default_factory=dict)  # storages it made: key -> bytes
    died: int = 0  # bytes of those that died in the forward (the cache holds them)
    mutated: bool = False  # written in place in the forward by a non-idempotent operator
    packs: int = 0  # tensors its unit's forward had saved for backward before it ran

    def kept_at(self, min_intensity: float) -> bool:
        return self.base if min_intensity <= 0 else self.score >= min_intensity


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
        # what no rule keeps: run again in backward by every selective rule
        self.rest_time = [dict.fromkeys(GPUS, 0.0) for _ in range(n)]
        self.rest_flops = [0] * n
        self.calls: list[list[_Call]] = [[] for _ in range(n)]
        # candidates' outputs alive in the forward (storage key -> call), any unit's: a later
        # unit may write its input in place. Keys of dead storages are reused by later ones,
        # so they leave when the storage dies.
        self._made: dict[int, _Call] = {}
        self.forward_done = False
        self._refs: list[weakref.ref] = []
        # torch's early stop (checkpoint(..., use_reentrant=False)) ends a recomputation at
        # the last tensor its forward saved for backward: per unit, how many it saved, and
        # the FLOPs and time of what ran after the last one (all operators; the rest)
        self.packs = [0] * n
        self.after_flops = [0] * n
        self.after_time = [dict.fromkeys(GPUS, 0.0) for _ in range(n)]
        self.rest_after_flops = [0] * n
        self.rest_after_time = [dict.fromkeys(GPUS, 0.0) for _ in range(n)]

    def __call__(self, func, args, kwargs, out, flops: int) -> None:
        if func.is_view:
            return  # an alias: no data moves
        out_bytes = _bytes(out)
        moved = _bytes((args, kwargs)) + out_bytes
        times = [(k, roofline_seconds(flops, moved, d, self.dtype)) for k, d in self._devices]
        step_time = self.step_time
        for k, t in times:
            step_time[k] += t
        if mutates_first(func) and isinstance(args[0], torch.Tensor) and not self.forward_done:
            call = self._made.get(storage_key(args[0].untyped_storage()))
            if call is not None and func.overloadpacket.__name__ not in IDEMPOTENT_INPLACE:
                call.mutated = True
        i = self.unit()
        if i is None:
            return
        fwd, after = self.fwd_time[i], self.after_time[i]
        self.after_flops[i] += flops
        for k, t in times:
            fwd[k] += t
            after[k] += t
        if is_candidate(func):
            # kitcore.selective.keeps: a rule by score keeps nothing computed with grad off
            first = next((t for t in tree_leaves(out) if isinstance(t, torch.Tensor)), None)
            score = (
                roofline_score(flops, moved, out_bytes, first.dtype)
                if torch.is_grad_enabled() and first is not None
                else 0.0
            )
            call = _Call(score, is_kept_op(func), flops, dict(times), packs=self.packs[i])
            self.calls[i].append(call)
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    key = storage_key(st)
                    if key not in self.excluded and key not in self._made:
                        self._made[key] = call
                        call.alive[key] = st.nbytes()
                        self._refs.append(weakref.ref(st, self._died(key, call)))
        else:
            self.rest_flops[i] += flops
            self.rest_after_flops[i] += flops
            rest, rest_after = self.rest_time[i], self.rest_after_time[i]
            for k, t in times:
                rest[k] += t
                rest_after[k] += t

    def pack(self, i: int | str) -> None:
        """Autograd saves a tensor for backward while ``i`` runs (a unit's index in forward).
        An operator's inputs are saved before it runs, its outputs after."""
        if isinstance(i, int) and not self.forward_done:
            self.packs[i] += 1
            self.after_flops[i] = self.rest_after_flops[i] = 0
            self.after_time[i] = dict.fromkeys(GPUS, 0.0)
            self.rest_after_time[i] = dict.fromkeys(GPUS, 0.0)

    def finish_forward(self) -> None:
        """The forward is over: storages that die from now on were kept to backward."""
        self.forward_done = True

    def _died(self, key: int, call: _Call):
        def died(_ref: weakref.ref) -> None:
            if not self.forward_done and self._made.get(key) is call:
                del self._made[key]
                call.died += call.alive.pop(key)

        return died

    def unsafe(self, i: int, min_intensity: float = 0.0) -> bool:
        """Whether unit ``i`` at this threshold keeps an output its code mutates in place in
        a way recomputation would repeat."""
        return any(c.mutated and c.kept_at(min_intensity) for c in self.calls[i])

    def scores(self, i: int) -> list[tuple[float, int]]:
        """Unit ``i``'s candidate calls as (score in FLOPs per output byte, bytes the cache
        would hold), descending by score."""
        calls = self.calls[i]
        return sorted(((c.score, sum(c.alive.values()) + c.died) for c in calls), reverse=True)

    def threshold(self, i: int, min_intensity: float) -> tuple[dict[int, int], int, int, dict]:
        """Under threshold ``min_intensity`` (:func:`kitcore.selective.keeps`): the kept
        storages alive at the forward's end, the kept bytes that died in it, and the FLOPs
        and time per device recomputed: up to the unit's last save for backward, where
        torch's early stop ends the recomputation (a selective unit is its own region)."""
        kept, dead = {}, 0
        flops = self.rest_flops[i] - self.rest_after_flops[i]
        time = {k: t - self.rest_after_time[i][k] for k, t in self.rest_time[i].items()}
        for c in self.calls[i]:
            if c.kept_at(min_intensity):
                kept.update(c.alive)
                dead += c.died
            elif c.packs < self.packs[i]:
                flops += c.flops
                for k, t in c.times.items():
                    time[k] += t
        return kept, dead, flops, time
