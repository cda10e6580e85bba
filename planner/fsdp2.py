"""What FSDP2 (``fully_shard``) holds on one rank, event by event of a training step.

The memory model (:mod:`planner.memory`) replays a step as events; under FSDP the static part
of each event is not a constant but follows FSDP2's own schedule (torch's
``_fsdp_param_group.py``, ``_fsdp_collectives.py``), which this module reproduces for a chain
of units sharded by :func:`fsdpkit.apply_fsdp` (every unit, then the root owning the rest;
BatchNorm replicated or kept gathered; explicit prefetch of depth ``p``):

- **Sharding pads dim 0.** A parameter of ``rows`` rows keeps ``ceil(rows / ws)`` rows per rank
  (rank 0 holds a full chunk); a unit's all-gather gathers ``ws`` padded shards. Sharded
  parameters, optimizer state and sharded gradients are counted at rank 0's shard.
- **Forward**, unit ``i`` running: its un-sharded parameters, its all-gather output (kept
  until the next unit's copy-out so the copy overlaps the next collective), the outputs of
  the ``p`` units it prefetched, and the root's parameters (the root never reshards after
  forward). The root frees the last all-gather output when its forward ends. At unit
  ``i``'s copy-out (its "gather" moment), its parameters are un-sharded while the previous
  unit's all-gather output is still kept beside its own: a unit with a small working set
  after one with large parameters peaks there.
- **Backward**, unit ``i`` running: its un-sharded parameters and gradients (training dtype),
  the all-gathers prefetched for the next units of backward (at least one: FSDP2 prefetches
  implicitly), the reduce-scatter input of the unit before it in backward (FSDP2 keeps one
  in flight), the sharded FP32 gradients of every unit already reduced, and the root's
  parameters and gradients (the root reduces last). At unit ``i``'s reduce-scatter its
  gradients and its reduce-scatter input (reduce dtype, padded) coexist.
- **Recomputation** of a checkpointed segment ``[s, e)`` runs inside unit ``e - 1``'s
  backward through the units' own forward hooks, which gather each unit and keep it gathered
  until its own backward (FSDP2 reshards after forward only outside backward); the all-gather
  output of the last unit recomputed is released when the recomputation ends
  (:func:`fsdpkit.apply_ac`).

Trade-off made visible: each prefetched unit costs its gathered bytes in forward and in
backward; a checkpointed segment keeps all its units gathered while it is recomputed and
run backward, so long segments of large units cost parameters as well as activations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kitcore import DTYPES

__all__ = ["PRE_HELD", "ShardedStatics", "shard_rows"]

Rows = tuple[tuple[int, int], ...]
PRE_HELD = "tensors the code before the units holds through forward"


def shard_rows(model: nn.Module, units: Sequence[nn.Module]) -> tuple[Rows, ...]:
    """Per unit, then the root (parameters outside every unit): ``(rows, numel)`` of each
    non-BatchNorm parameter, in registration order (what ``fully_shard`` gathers)."""
    bn = {id(p) for m in model.modules() if isinstance(m, _BatchNorm) for p in m.parameters()}
    seen = set(bn)
    groups = []
    for group in [*units, model]:
        rows = []
        for p in group.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                rows.append((p.shape[0] if p.dim() else 1, p.numel()))
        groups.append(tuple(rows))
    return tuple(groups)


def _shard(rows: Rows, ws: int) -> int:
    """Elements of rank 0's padded shard of a group's parameters."""
    return sum(math.ceil(r / ws) * (n // r if r else 0) for r, n in rows)


class ShardedStatics:
    """Static bytes (by name) at each event of a sharded step; see the module docstring.

    ``prof``: a :class:`~planner.profile.ModelProfile`; ``cfg``: a sharded
    :class:`~planner.memory.MemoryConfig`; ``state_elems``: FP32 optimizer-state elements per
    parameter. Units are ``0..n-1``; ``n`` stands for the root's own work (the tail).
    """

    sharded = True

    def __init__(self, prof: Any, cfg: Any, state_elems: int) -> None:
        self.c = cfg
        ws = cfg.world_size
        n = len(prof.units)
        rows = list(prof.shard_rows) or [
            ((u.param_numel, u.param_numel),) if u.param_numel else () for u in prof.units
        ] + [((prof.tail_param_numel, prof.tail_param_numel),) if prof.tail_param_numel else ()]
        if len(rows) != n + 1:
            raise ValueError(f"profile has {len(rows)} parameter groups for {n} units + root")
        e = DTYPES[prof.dtype].itemsize if prof.dtype in DTYPES else 4
        self._r = DTYPES[cfg.reduce_dtype].itemsize
        shard = [_shard(g, ws) for g in rows]
        numel = [sum(n_ for _, n_ in g) for g in rows]
        self._n = n
        self._gathered = [e * ws * s for s in shard]  # un-sharded params = all-gather output
        self._ag = self._gathered if ws > 1 else [0] * (n + 1)  # ws 1: no all-gather buffer
        self._grads = [e * u for u in numel]  # un-sharded gradients, training dtype
        self._rs = [self._r * ws * s for s in shard]  # reduce-scatter input, padded
        self._sgrad = [4 * s for s in shard]  # sharded FP32 gradients (views of the output)
        self._sgrad_after = [sum(self._sgrad[i + 1 : n]) for i in range(n)] + [0]
        self._shard_elems = sum(shard)
        self._biggest = max(
            (math.ceil(r / ws) * (n_ // r) for g in rows for r, n_ in g if r), default=0
        )
        self._bwd_prefetch = max(cfg.prefetch, 1)  # FSDP2 prefetches one implicitly
        self._fwd_prefetch = cfg.prefetch
        self._loss = 2 * prof.loss_bytes  # the loss and its gradient, through backward
        self._pre_held = prof.pre_held_bytes

        bn = prof.bn_param_numel
        inputs = prof.raw_input_bytes or prof.input_bytes
        # The root casts the input to the training dtype: the copy lives through forward, and
        # through backward only if something saves it.
        cast = prof.input_bytes if prof.dtype != "fp32" and prof.raw_input_bytes else 0
        self._cast_fwd_only = 0 if prof.input_saved else cast
        inputs += cast - self._cast_fwd_only
        self.base = {
            "parameters (sharded fp32)": 4 * self._shard_elems,
            "optimizer state (sharded)": 4 * state_elems * self._shard_elems,
            "inputs and buffers": inputs + prof.buffer_bytes,
            "fixed overhead": cfg.overhead_bytes,
        }
        if bn and cfg.batchnorm == "replicate":
            self.base["BatchNorm parameters, gradients, state (replicated fp32)"] = (
                4 * (2 + state_elems) * bn
            )
        elif bn:
            bn_shard = math.ceil(bn / ws)
            self.base["BatchNorm (sharded fp32, gathered and kept)"] = (
                4 * (2 + state_elems) * bn_shard + 4 * bn
            )
        self._bn_bucket = 4 * bn if cfg.batchnorm == "replicate" else 0

    # -- helpers -------------------------------------------------------------------------
    def _sum(self, xs: list[int], idx) -> int:
        return sum(xs[j] for j in idx if 0 <= j < self._n)

    def _kept_after_forward(self, i: int) -> int:
        """Units before ``i`` still gathered when they do not reshard after forward."""
        return 0 if self.c.reshard_after_forward else self._sum(self._gathered, range(i))

    def _backward_gathers(self, i: int, first: int, through: int) -> tuple[int, int]:
        """(gathered, prefetched) bytes while unit ``i`` of a segment gathered from unit
        ``first`` is in backward: the root and units ``first..through-1`` are gathered."""
        g = self._gathered
        gathered = g[-1] + self._sum(g, range(first, through)) + self._kept_after_forward(first)
        return gathered, self._pending(i, first)

    def _pending(self, i: int, first: int) -> int:
        """All-gathers prefetched for the units before ``i`` in backward and not gathered
        yet (a checkpointed segment from ``first`` is; so is every unit kept after forward)."""
        if not self.c.reshard_after_forward:
            return 0
        return self._sum(self._ag, range(i - self._bwd_prefetch, min(i, first)))

    def _terms(self, unsharded: int, ag: int, grads: int = 0, rs: int = 0, sg: int = 0, bwd=True):
        s = dict(self.base)
        if bwd:
            s["loss and its gradient"] = self._loss
        s["unsharded parameters"] = unsharded
        s["all-gather buffers"] = ag
        if grads:
            s["unsharded gradients"] = grads
        if rs:
            s["reduce-scatter input"] = rs
        if sg:
            s["gradients (sharded fp32)"] = sg
        return s

    # -- forward ---------------------------------------------------------------------------
    def fwd(self, i: int) -> dict[str, int]:
        """Unit ``i`` runs forward (``i == n``: the root's tail)."""
        n, g = self._n, self._gathered
        if i >= n:
            kept = self._kept_after_forward(n)
            s = self._terms(g[-1] + kept, self._ag[n - 1] if n else 0, bwd=False)
        else:
            ahead = range(i + 1, i + 1 + self._fwd_prefetch)
            ag = self._ag[i] + self._sum(self._ag, ahead)
            s = self._terms(g[-1] + g[i] + self._kept_after_forward(i), ag, bwd=False)
        if held := self._pre_held + self._cast_fwd_only:
            s[PRE_HELD] = held
        return s

    def enter(self, i: int) -> dict[str, int]:
        """Unit ``i``'s pre-forward, at its copy-out: its parameters are un-sharded while the
        previous unit's all-gather output (the root's for unit 0) is still kept beside its
        own and those prefetched for the units after it; the previous unit has resharded."""
        ahead = range(i + 1, i + self._fwd_prefetch)
        ag = self._ag[i - 1 if i else -1] + self._ag[i] + self._sum(self._ag, ahead)
        g = self._gathered
        s = self._terms(g[-1] + g[i] + self._kept_after_forward(i), ag, bwd=False)
        if held := self._pre_held + self._cast_fwd_only:
            s[PRE_HELD] = held
        return s

    def pre(self) -> dict[str, int]:
        """The root's forward before unit 0: its parameters and their all-gather output."""
        s = self._terms(self._gathered[-1], self._ag[-1], bwd=False)
        if self._cast_fwd_only:
            s[PRE_HELD] = self._cast_fwd_only
        return s

    # -- backward --------------------------------------------------------------------------
    def _root_bwd(self) -> int:
        return self._grads[-1]  # the root's gradients live until it reduces, last

    def bwd(self, i: int, s: int | None = None, ckpt: bool = False) -> dict[str, int]:
        """Unit ``i`` runs backward, in a segment starting at ``s`` (checkpointed or not)."""
        n, g = self._n, self._gathered
        if i >= n:
            pending = self._ag[n - 1] if n else 0
            kept = self._kept_after_forward(n)
            return self._terms(g[-1] + kept, pending, self._root_bwd())
        first = s if ckpt and s is not None else i
        gathered, pending = self._backward_gathers(i, first, through=i + 1)
        rs = self._rs[i + 1] if i + 1 < n else 0
        # the unit's own gradients form during its backward: its profiled peak has them
        return self._terms(gathered, pending, self._root_bwd(), rs, self._sgrad_after[i])

    def reduce(self, i: int, s: int | None = None, ckpt: bool = False) -> dict[str, int]:
        """Unit ``i``'s reduce-scatter: its parameters resharded, its gradients copied into
        the reduce-scatter input (``i == n``: the root's, last of the step)."""
        n = self._n
        if i >= n:
            grads, sg = self._grads[-1], sum(self._sgrad[:n])
            return self._terms(0, 0, grads, self._rs[-1], sg)
        first = s if ckpt and s is not None else i
        gathered, pending = self._backward_gathers(i, first, through=i)  # i resharded
        grads = self._root_bwd() + self._grads[i]
        return self._terms(gathered, pending, grads, self._rs[i], self._sgrad_after[i])

    def recompute(self, k: int, s: int, e: int) -> dict[str, int]:
        """Unit ``k`` of checkpointed segment ``[s, e)`` recomputed in unit ``e - 1``'s
        backward: units ``s..k`` and ``e - 1`` gathered, ``k``'s all-gather output kept (the
        last unit skips its forward hook), prefetches still pending."""
        g, last = self._gathered, e - 1
        gathered = g[-1] + self._sum(g, range(s, k + 1)) + self._kept_after_forward(s)
        if k < last:
            gathered += g[last]
        pend = {j for j in range(last - self._bwd_prefetch, last) if not s <= j <= k}
        pend |= {j for j in range(k + 1, k + 1 + self._fwd_prefetch) if j < last}
        if not self.c.reshard_after_forward:
            pend = set()
        ag = self._sum(self._ag, pend) + (self._ag[k] if k < last else 0)
        rs = self._rs[e] if e < self._n else 0
        sg = self._sgrad_after[last]
        return self._terms(gathered, ag, self._root_bwd(), rs, sg)

    def end_of_backward(self) -> dict[str, int]:
        """After the last reduce-scatter: every sharded gradient, and the one all-reduce
        bucket of the replicated BatchNorm gradients."""
        s = self._terms(0, 0, sg=sum(self._sgrad), bwd=False)
        if self._bn_bucket:
            s["BatchNorm gradient bucket"] = self._bn_bucket
        return s

    def optimizer_step(self) -> dict[str, int]:
        s = self._terms(0, 0, sg=sum(self._sgrad), bwd=False)
        if self.c.optimizer == "adamw":
            s["optimizer temporaries"] = 4 * self._shard_elems
        elif self.c.optimizer == "sgd" and self.c.weight_decay:  # one shard-sized temporary
            s["optimizer temporaries"] = 4 * self._biggest
        return {k: v for k, v in s.items() if v or k in self.base}
