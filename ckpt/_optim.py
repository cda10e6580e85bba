"""Optimizer state back from named tensors, shared by the sharded and the sliced loaders."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ._format import CheckpointError


def restore_optimizer(
    manifest: dict[str, Any],
    model: nn.Module,
    optimizer,
    tensors: dict[str, tuple[torch.Tensor, bool]],
) -> None:
    """Load ``optimizer`` from ``tensors`` (``optim/<param>/<key>`` → (tensor, is it this rank's
    piece of a tensor laid out like its DTensor parameter: its rows of a dim-0 shard on that
    parameter's mesh, or all of a replicated one)) and the manifest's non-tensor state and
    parameter groups (by name)."""
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    order = [n for g in manifest["optimizer"]["param_groups"] for n in g["params"]]
    current = [names.get(id(p)) for g in optimizer.param_groups for p in g["params"]]
    if current != order:
        raise CheckpointError(
            "the optimizer's parameters differ from the checkpoint's (order or set); build it "
            "over model.parameters() as when saving"
        )
    state: dict[int, dict[str, Any]] = {}
    for i, pname in enumerate(order):
        entry = dict(manifest["optimizer"]["state"].get(pname, {}))
        prefix = f"optim/{pname}/"
        for tname, (t, shard) in tensors.items():
            if tname.startswith(prefix):
                p = params[pname]
                if shard and isinstance(p, DTensor):  # shard it like its parameter
                    t = DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape,
                                           stride=p.stride())  # fmt: skip
                entry[tname[len(prefix) :]] = t
        if entry:
            state[i] = entry
    groups, start = [], 0
    for g in manifest["optimizer"]["param_groups"]:
        groups.append(g | {"params": list(range(start, start + len(g["params"])))})
        start += len(g["params"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
