"""One instrument for every row of ``bench_recompute.py``: the FLOPs and roofline time of the
operators a step actually runs, recomputation included.

Eager steps (plain, ours, ``sac_ilp``) are counted by a dispatch mode as they run; compiled
steps by walking the partitioner's forward and backward graphs. Per operator the cost is the
planner's (:func:`planner.devices.roofline_seconds`): FLOPs from torch's
``flop_registry``, bytes moved = tensor arguments + outputs, views move nothing. Recompute time
is then a difference of two counts of the same kind: the row's step minus the plain step's
(for compile, minus the graphs at ``activation_memory_budget=1.0``), so an instrument's bias
cancels rather than favouring one method.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import flop_registry

from planner.devices import Device, roofline_seconds


def _nbytes(obj) -> int:
    return sum(t.nbytes for t in tree_leaves(obj) if isinstance(t, torch.Tensor))


def op_cost(func, args, kwargs, out, device: Device, dtype: str) -> tuple[int, float]:
    """(FLOPs, roofline seconds) of one ATen operator call."""
    count = flop_registry.get(func._overloadpacket)
    flops = count(*args, **kwargs, out_val=out) if count is not None else 0
    if func.is_view:
        return flops, 0.0
    moved = _nbytes((args, kwargs)) + _nbytes(out)
    return flops, roofline_seconds(flops, moved, device, dtype)


class RooflineCount(TorchDispatchMode):
    """Sum (FLOPs, roofline seconds) of every operator run under it, backward included."""

    def __init__(self, device: Device, dtype: str = "fp32") -> None:
        super().__init__()
        self.device, self.dtype = device, dtype
        self.flops, self.seconds = 0, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flops, seconds = op_cost(func, args, kwargs, out, self.device, self.dtype)
        self.flops += flops
        self.seconds += seconds
        return out


def count_step(step, device: Device, dtype: str = "fp32") -> dict:
    """Run ``step`` once under :class:`RooflineCount`: ``{"flops", "roofline_s"}``."""
    with RooflineCount(device, dtype) as c:
        step()
    return {"flops": c.flops, "roofline_s": c.seconds}


def graph_cost(gm: torch.fx.GraphModule, device: Device, dtype: str = "fp32") -> tuple[int, float]:
    """(FLOPs, roofline seconds) of the ATen calls of an FX graph, from its ``val`` metadata."""
    flops = seconds = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        if "val" not in n.meta:
            continue
        args, kwargs = tree_map(
            lambda v: v.meta.get("val") if isinstance(v, torch.fx.Node) else v,
            (n.args, n.kwargs),
        )
        f, s = op_cost(n.target, args, kwargs, n.meta["val"], device, dtype)
        flops += f
        seconds += s
    return flops, seconds
