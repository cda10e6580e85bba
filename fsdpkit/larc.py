"""LARC for sharded parameters: per-parameter trust ratios from one all-reduce per step.

SEER (appendix D) scales each parameter's gradient by ``η‖w‖ / (‖g‖ + β‖w‖ + eps)``. With
FSDP the norms need the whole parameter, which no rank has: each rank sums the squares of its
shards of every parameter and gradient, and **one** all-reduce of a ``2L``-element vector
(``L`` sharded parameters, every group batched) turns them into global norms. Nothing is
all-gathered, and nothing waits on the host: norms, ratios and the gradient update are
vectorised over parameters with ``torch._foreach_*`` kernels.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.optim import Optimizer

__all__ = ["LARC"]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _shard_group(p: torch.Tensor) -> dist.ProcessGroup | None:
    """The group to sum a parameter's squares over: the mesh dimensions it is sharded on."""
    if not isinstance(p, DTensor):
        return None  # a plain tensor (one process, or DDP's replicas) holds the whole parameter
    dims = [d for d, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    if not dims:
        return None
    if len(dims) > 1:
        raise NotImplementedError("LARC: parameters sharded over several mesh dimensions")
    return p.device_mesh.get_group(dims[0])


class LARC(Optimizer):
    """Layer-wise adaptive rate control around any optimizer (SGD with momentum for SEER).

    Before the inner step, for every parameter ``w`` with gradient ``g`` in a group with
    weight decay ``β`` and learning rate ``lr``::

        rate = η‖w‖ / (‖g‖ + β‖w‖ + eps)      (1 where ‖w‖ or ‖g‖ is 0)
        rate = min(rate / lr, 1)              (clip=True)
        g    = (g + β·w) · rate

    then the inner optimizer steps with weight decay 0: LARC takes decay over. With
    ``exclude_1d=True``, 1-D parameters (BatchNorm, biases) keep their gradient as is (no
    adaptation, no decay). The inner optimizer's ``param_groups`` and ``state`` are shared, so
    LR schedulers, ``GradScaler`` (unscale, then step; a skipped step changes nothing) and
    ``state_dict`` work on the wrapper.

    Communication: one all-reduce of ``2L`` FP32 elements per step over the shard group when
    ``L`` parameters are FSDP2 ``DTensor`` shards; none for plain or DDP parameters.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        trust_coefficient: float = 0.001,
        clip: bool = False,
        eps: float = 1e-8,
        exclude_1d: bool = False,
    ) -> None:
        if trust_coefficient <= 0 or eps < 0:
            raise ValueError("LARC needs trust_coefficient > 0 and eps >= 0")
        self.optim = optimizer
        self.trust_coefficient, self.clip, self.eps = trust_coefficient, clip, eps
        self.exclude_1d = exclude_1d
        # Optimizer.__init__ appends the inner group dicts themselves: both see one list.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.state = optimizer.state

    def __repr__(self) -> str:
        return (
            f"LARC(trust_coefficient={self.trust_coefficient}, clip={self.clip}, "
            f"eps={self.eps}, exclude_1d={self.exclude_1d}, optimizer={self.optim!r})"
        )

    def state_dict(self) -> dict[str, Any]:
        return self.optim.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optim.load_state_dict(state_dict)
        self.param_groups, self.state = self.optim.param_groups, self.optim.state

    @torch.no_grad()
    def _adapt(self) -> None:
        entries = []  # (param, group) for every parameter with a gradient
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not (self.exclude_1d and p.ndim <= 1):
                    entries.append((p, group))
        if not entries:
            return
        w = [_local(p) for p, _ in entries]
        g = [_local(p.grad) for p, _ in entries]
        sq = _sum_squares(w + g)  # (2L,) FP32 (FP64 if any is): local sums of squares, w then g
        shard_groups = [_shard_group(p) for p, _ in entries]
        distinct = {id(pg): pg for pg in shard_groups if pg is not None}
        if len(distinct) > 1:
            raise NotImplementedError("LARC: parameters sharded over different process groups")
        if distinct:
            pg = next(iter(distinct.values()))
            if all(x is not None for x in shard_groups):
                dist.all_reduce(sq, group=pg)  # the one collective of the step
            else:  # replicated parameters already hold their whole norm: reduce the rest only
                rows = [i for i, x in enumerate(shard_groups * 2) if x is not None]
                idx = torch.tensor(rows, device=sq.device)
                part = sq[idx]
                dist.all_reduce(part, group=pg)
                sq[idx] = part
        norms = sq.sqrt()
        w_norm, g_norm = norms[: len(entries)], norms[len(entries) :]
        device = w_norm.device
        wd = torch.tensor([grp.get("weight_decay", 0.0) for _, grp in entries], device=device,
                          dtype=sq.dtype)  # fmt: skip
        rate = self.trust_coefficient * w_norm / (g_norm + wd * w_norm + self.eps)
        if self.clip:
            lr = torch.tensor([float(grp["lr"]) for _, grp in entries], device=device,
                              dtype=sq.dtype)  # fmt: skip
            rate = torch.minimum(rate / lr, torch.ones_like(rate))
        rate = torch.where((w_norm > 0) & (g_norm > 0), rate, torch.ones_like(rate))
        by_decay: dict[float, list[int]] = defaultdict(list)
        for i, (_, grp) in enumerate(entries):
            by_decay[float(grp.get("weight_decay", 0.0))].append(i)
        for decay, idx in by_decay.items():
            if decay:
                torch._foreach_add_([g[i] for i in idx], [w[i] for i in idx], alpha=decay)
        rates = rate.unbind()
        for idx in _by_device_dtype(g):
            torch._foreach_mul_([g[i] for i in idx], [rates[i].to(g[i].dtype) for i in idx])

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._adapt()
        decays = [group.get("weight_decay", 0.0) for group in self.param_groups]
        for group in self.param_groups:
            if "weight_decay" in group:
                group["weight_decay"] = 0.0
        try:
            self.optim.step()
        finally:
            for group, decay in zip(self.param_groups, decays, strict=True):
                if "weight_decay" in group:
                    group["weight_decay"] = decay
        return loss


def _by_device_dtype(tensors: list[torch.Tensor]) -> list[list[int]]:
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        buckets[(t.device, t.dtype)].append(i)
    return list(buckets.values())


def _sum_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """FP32 sum of squares of every tensor, as one (len(tensors),) vector (empty → 0)."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for idx in _by_device_dtype(tensors):
        acc = torch.promote_types(tensors[idx[0]].dtype, torch.float32)  # FP64 stays FP64
        norms = torch._foreach_norm([tensors[i] for i in idx], 2, dtype=acc)
        for i, n in zip(idx, norms, strict=True):
            out[i] = n
    return torch.stack(out).square()  # type: ignore[arg-type]
