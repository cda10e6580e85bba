"""FSDP2 (``fully_shard``) applied the way SEER needs it, in one call.

:func:`parallelize` runs, in this fixed order:

1. ``convert_sync_batchnorm`` (module replacement must precede sharding);
2. :func:`~fsdpkit.ac.apply_ac` with the plan (hooks first, so checkpointing sits *inside*
   each sharded unit and recomputation re-uses the unit's all-gather);
3. :func:`apply_fsdp`, bottom-up: every BatchNorm as its own FP32 unit, then every unit of the
   chain in the policy's dtype, then FP32 modules (SwAV head, prototypes), the root last;
4. prefetch wiring (:func:`set_prefetch`): unit *i* all-gathers units *i+1..i+k* in forward
   and *i-1..i-k* in backward, so communication overlaps compute.

Memory: parameters, gradients and optimizer state are sharded (÷ world size); at any time a
rank holds the un-sharded parameters of the running unit and of the ``prefetch`` next ones, in
the all-gather dtype (FP16/BF16: half the bytes of FP32). BatchNorm all-gathers its (small)
parameters separately in FP32 and always normalises in FP32, but takes its input in the
training dtype and keeps only that for backward (no FP32 copy of it: see :mod:`.syncbn`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.modules.batchnorm import _BatchNorm

from kitcore import DTYPES, FsdpkitError, FSDPPolicy

from ._torch_private import queue_end_of_backward
from .ac import CheckpointPlan, apply_ac
from .syncbn import convert_sync_batchnorm

__all__ = ["apply_fsdp", "parallelize", "set_prefetch"]

# fully_shard(ignored_params=...) arrived in torch 2.7; replicated BatchNorm needs it.
_CAN_IGNORE = "ignored_params" in inspect.signature(fully_shard).parameters


def _mp(
    param: str, reduce: str, output: str | None = None, cast_inputs: bool = True
) -> MixedPrecisionPolicy:
    return MixedPrecisionPolicy(
        param_dtype=DTYPES[param],
        reduce_dtype=DTYPES[reduce],
        output_dtype=DTYPES[output] if output else None,
        cast_forward_inputs=cast_inputs,
    )


def apply_fsdp(
    model: nn.Module,
    units: Sequence[nn.Module],
    mesh: DeviceMesh | None = None,
    policy: FSDPPolicy | None = None,
) -> list[nn.Module]:
    """Shard ``model`` bottom-up with ``fully_shard``; returns the sharded units in order.

    BatchNorm modules become FP32 units whose input is *not* cast (FP32 parameters and
    arithmetic on the ``param_dtype`` input, which is what backward keeps; output in
    ``param_dtype``); each of ``units`` becomes a unit in ``param_dtype``;
    ``policy.fp32_modules`` become FP32 units; the root is sharded last (it owns whatever
    parameters remain).
    """
    policy = policy or FSDPPolicy()
    if not units:
        raise FsdpkitError("apply_fsdp needs at least one unit to shard")
    kw: dict = {"mesh": mesh, "reshard_after_forward": policy.reshard_after_forward}
    low = policy.param_dtype
    full = "fp64" if low == "fp64" else "fp32"  # BatchNorm and fp32_modules: never below FP32
    bns = [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and next(m.parameters(), None) is not None
    ]
    if policy.resolved_batchnorm() == "replicate":
        if not _CAN_IGNORE:
            raise FsdpkitError(
                "FSDPPolicy(batchnorm='replicate') needs torch >= 2.7 "
                "(fully_shard(ignored_params=...)); use batchnorm='units'"
            )
        kw["ignored_params"] = {p for m in bns for p in m.parameters()}
        _average_grads_after_backward(bns, mesh.get_group() if mesh else None)
        bns = []
    for m in bns:
        # A BatchNorm runs once per resolution group inside its unit; resharding its 2·C
        # parameters after each call would all-gather them again for every group and again in
        # backward. Keeping them un-sharded costs 2·C·4 bytes per layer.
        # No input cast: an FP32 copy of the input would be what backward saves (2× the bytes
        # of an FP16/BF16 activation); BatchNorm upcasts inside its arithmetic instead.
        out = low if low != full else None
        mp = _mp(full, full, out, cast_inputs=False)
        fully_shard(m, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    for unit in units:
        fully_shard(unit, mp_policy=_mp(low, policy.reduce_dtype), **kw)
    for name in policy.fp32_modules:
        try:
            sub = model.get_submodule(name)
        except AttributeError:
            raise FsdpkitError(f"FSDPPolicy.fp32_modules: the model has no {name!r}") from None
        fully_shard(sub, mp_policy=_mp(full, full), **kw)
    fully_shard(model, mp_policy=_mp(low, policy.reduce_dtype), **kw)
    set_prefetch(list(units), policy.prefetch)
    return list(units)


def _average_grads_after_backward(modules: list[nn.Module], group) -> None:
    """Average the gradients of ``modules``' parameters over ``group`` with one all-reduce at
    the end of each backward (queued from the first gradient accumulated, as DDP does; no
    public hook fires when a backward ends: see :mod:`._torch_private`).

    Hooks are (re)attached to the parameters each module holds at its forward, not to the
    objects present now: ``to_empty`` after sharding a meta-built model replaces these
    replicated parameters with new ones, which would silently drop hooks attached here.
    """
    queued = [False]

    def all_reduce_bucket() -> None:
        queued[0] = False
        grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one bucket: one collective
        dist.all_reduce(flat, group=group)
        flat /= dist.get_world_size(group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def on_grad(_p: torch.Tensor) -> None:
        if not queued[0]:
            queued[0] = True
            queue_end_of_backward(all_reduce_bucket)

    def attach(module: nn.Module, _args) -> None:
        for p in module.parameters():
            if not getattr(p, "_fsdpkit_grad_averaged", False):
                p.register_post_accumulate_grad_hook(on_grad)
                p._fsdpkit_grad_averaged = True

    for m in modules:
        m.register_forward_pre_hook(attach)


def set_prefetch(units: Sequence[nn.Module], depth: int) -> None:
    """Unit *i* all-gathers units *i+1..i+depth* before its forward and *i-1..i-depth* before
    its backward (FSDP2's explicit prefetch)."""
    if depth <= 0:
        return
    for i, unit in enumerate(units):
        unit.set_modules_to_forward_prefetch(list(units[i + 1 : i + 1 + depth]))
        unit.set_modules_to_backward_prefetch(list(units[max(i - depth, 0) : i])[::-1])


def parallelize(
    model: nn.Module,
    *,
    plan: CheckpointPlan | None = None,
    units: Sequence[nn.Module] | None = None,
    mesh: DeviceMesh | None = None,
    policy: FSDPPolicy | None = None,
) -> nn.Module:
    """SyncBN, checkpointing, sharding and prefetch, in that order (see the module docstring).

    ``plan`` (e.g. a ``planner.Plan``) names the units and which segments to checkpoint;
    without one, pass ``units`` (nothing is checkpointed). Returns ``model`` (sharded in
    place). Raises :class:`FsdpkitError` for a plan that does not match the model.
    """
    policy = policy or FSDPPolicy()
    if plan is None and not units:
        raise FsdpkitError("parallelize needs a plan or the model's units")
    check = getattr(plan, "check_setup", None)  # a planner.Plan records what it was made for
    if callable(check):
        if mesh is not None:
            world = mesh.size(mesh.ndim - 1)  # the sharding dimension (HSDP: the last)
        else:
            world = dist.get_world_size() if dist.is_initialized() else 1
        check(
            "plan", world_size=world, sharded=True, dtype=policy.param_dtype,
            reduce_dtype=policy.reduce_dtype, prefetch=policy.prefetch,
            reshard_after_forward=policy.reshard_after_forward,
            batchnorm=policy.resolved_batchnorm(),
        )  # fmt: skip
    # 1. SyncBatchNorm first: replacing modules after sharding would lose the sharded state.
    if policy.sync_bn_group_size != -1:
        convert_sync_batchnorm(model, policy.sync_bn_group_size)
    elif policy.param_dtype in ("fp16", "bf16"):
        # local, but FP32 maths on the low-precision input, which is all backward keeps
        convert_sync_batchnorm(model, 1)
    # 2. Checkpointing hooks before sharding hooks: recomputation runs inside each unit.
    if plan is not None:
        apply_ac(model, plan)
        units = [model.get_submodule(name) for name in plan.units]
    # 3. Sharding bottom-up, root last; 4. prefetch wiring.
    apply_fsdp(model, units, mesh, policy)
    return model
