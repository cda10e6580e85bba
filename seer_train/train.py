"""SEER's model composition and one SwAV training step, written to be read top to bottom.

:func:`build` turns a preset name into a sharded, checkpointed, initialised model:

1. **plan** — the planner profiles one step symbolically (meta device: no memory, no GPU) and
   picks the checkpoint segments with the least recomputation under the memory budget;
2. **checkpointing, sharding, prefetch** — :func:`fsdpkit.parallelize` applies the plan's
   checkpointing *inside* each unit, shards every unit with FSDP2 (BatchNorm, SwAV head and
   prototypes in FP32), and wires prefetch so all-gathers overlap compute;
3. **materialise** — parameters are created on ``meta``, so each rank allocates only its
   shard (``to_empty``) and initialises it in place.

:func:`train_step` is the whole step; nothing runs from a hook registry.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from fsdpkit import LARC, FsdpkitError, FSDPPolicy, get_model_spec, parallelize
from planner import MemoryConfig, Plan, plan_checkpoints, profile_model

from .loss import SwAVLossConfig, swav_loss
from .models import PRESETS, SEERPreset, init_weights

__all__ = ["TrainConfig", "build", "make_optimizer", "normalize_prototypes", "train_step"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """Everything that defines the optimisation (SPEC §3 defaults).

    batch_size: images per rank per step; dtype: ``fp32``, ``bf16`` or ``fp16`` (FP16 scales
    the loss); memory_budget: bytes per rank the plan must fit (None: no checkpointing);
    granularity: ``"op"`` (per unit: kept, op-level selective checkpointing or a checkpointed
    segment) or ``"unit"`` (whole-unit segments only), see :func:`planner.plan_checkpoints`;
    prefetch: units all-gathered ahead; sync_bn_group: ranks per SyncBatchNorm group (None:
    all ranks up to 8, SEER's node); freeze_prototypes_iters: iterations during which the
    prototypes receive no update.
    """

    model: str = "tiny"
    batch_size: int = 16
    dtype: str = "fp32"
    memory_budget: int | None = None
    objective: str = "recompute"
    granularity: str = "op"
    prefetch: int = 1
    sync_bn_group: int | None = None
    base_lr: float = 0.3
    warmup_fraction: float = 0.043648
    momentum: float = 0.9
    weight_decay: float = 1e-5
    trust_coefficient: float = 0.001
    freeze_prototypes_iters: int = 313
    loss: SwAVLossConfig = field(default_factory=SwAVLossConfig)

    def __post_init__(self) -> None:
        if self.model not in PRESETS:
            raise FsdpkitError(
                f"unknown SEER preset {self.model!r}; choose from {', '.join(PRESETS)}"
            )
        if self.batch_size < 1:
            raise FsdpkitError(f"batch size must be >= 1, got {self.batch_size}")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise FsdpkitError(f"dtype must be fp32, bf16 or fp16, got {self.dtype!r}")
        if not self.base_lr > 0 or not self.trust_coefficient > 0:
            raise FsdpkitError(
                f"--lr and --trust must be > 0, got {self.base_lr} and {self.trust_coefficient}"
            )
        if self.freeze_prototypes_iters < 0:
            raise FsdpkitError(
                f"--freeze-prototypes must be >= 0, got {self.freeze_prototypes_iters}"
            )

    @property
    def preset(self) -> SEERPreset:
        return PRESETS[self.model]


def memory_config(cfg: TrainConfig, world_size: int) -> MemoryConfig:
    """The step :func:`build` runs, as the planner models it: read from the same
    :class:`FSDPPolicy` that :func:`build` applies (SGD with weight decay, inside LARC)."""
    return MemoryConfig.from_policy(_policy(cfg, world_size), world_size, optimizer="sgd")


def solve_plan(cfg: TrainConfig, world_size: int) -> Plan:
    """Checkpoint plan for ``cfg`` on ``world_size`` FSDP ranks (symbolic: runs on meta).

    Without a memory budget the plan checkpoints nothing (the budget is unbounded).
    """
    profile = profile_model(get_model_spec(cfg.model), cfg.batch_size, dtype=cfg.dtype)
    mem = memory_config(cfg, world_size)
    budget = cfg.memory_budget if cfg.memory_budget is not None else 2**62
    plan = plan_checkpoints(
        profile, budget, mem, objective=cfg.objective, granularity=cfg.granularity
    )
    if cfg.memory_budget is not None and not plan.fits:
        raise FsdpkitError(
            f"{cfg.model} at batch {cfg.batch_size} needs {plan.peak_bytes / 2**30:.2f} GiB per "
            f"rank even with every unit checkpointed; the budget is "
            f"{cfg.memory_budget / 2**30:.2f} GiB: lower the batch or add ranks"
        )
    return plan


def check_plan(plan: Plan, cfg: TrainConfig, world_size: int, origin: str = "plan") -> None:
    """Refuse, with one line naming the field and both values, a plan made for another
    setup than ``cfg`` on ``world_size`` ranks (model, batch, dtype, world size, the FSDP
    policy's memory-relevant fields, the optimizer)."""
    mem = memory_config(cfg, world_size)
    plan.check_setup(
        origin, model=cfg.model, world_size=world_size, batch_size=cfg.batch_size,
        dtype=cfg.dtype, sharded=True,
        **{k: getattr(mem, k) for k in ("optimizer", "weight_decay", "reduce_dtype", "prefetch",
                                        "reshard_after_forward", "batchnorm")},
    )  # fmt: skip


def _policy(cfg: TrainConfig, world_size: int) -> FSDPPolicy:
    group = cfg.sync_bn_group if cfg.sync_bn_group is not None else min(world_size, 8)
    if world_size % group:
        raise FsdpkitError(f"--sync-bn-group {group} does not divide world size {world_size}")
    return FSDPPolicy(
        param_dtype=cfg.dtype,
        fp32_modules=("head", "prototypes"),  # Sinkhorn codes and the loss need FP32 scores
        prefetch=cfg.prefetch,
        sync_bn_group_size=group,
    )


def build(
    cfg: TrainConfig, plan: Plan, device: torch.device, seed: int = 0
) -> tuple[nn.Module, DeviceMesh]:
    """The SwAV model of ``cfg``: planned, checkpointed, sharded, prefetching, initialised.

    Memory per rank: the model's parameters ÷ world size (nothing is ever whole on one rank).
    """
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    model = get_model_spec(cfg.model).build_model("meta")  # no storage yet
    # Checkpointing inside every unit, then sharding bottom-up, then prefetch (fsdpkit.fsdp).
    parallelize(model, plan=plan, mesh=mesh, policy=_policy(cfg, world))
    model.to_empty(device=device)  # this rank's shards only
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # Each rank draws its own shard from its own generator: correct in distribution, and
        # what the warning about CPU meshes is about.
        warnings.filterwarnings("ignore", "DTensor random operators")
        init_weights(model)  # pycls init, shard by shard
    normalize_prototypes(model)
    return model, mesh


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> LARC:
    """SGD (momentum, no Nesterov, one group: BN and biases decayed too) inside LARC, whose
    norms come from one all-reduce over the shards."""
    sgd = torch.optim.SGD(
        model.parameters(), lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    return LARC(sgd, trust_coefficient=cfg.trust_coefficient, clip=False, eps=1e-8)


@torch.no_grad()
def normalize_prototypes(model: nn.Module) -> None:
    """Put every prototype row back on the unit sphere. Rows are sharded whole (dim 0), so
    each rank normalises its own rows: no communication."""
    w = model.prototypes.weight
    local = w.to_local() if isinstance(w, DTensor) else w
    local.copy_(F.normalize(local, dim=1, p=2))


def train_step(
    model: nn.Module,
    optimizer: LARC,
    scaler: torch.amp.GradScaler,
    crops: list[torch.Tensor],
    *,
    iteration: int,
    lr: float,
    cfg: TrainConfig,
    votes: torch.Tensor | None = None,
) -> dict[str, Any]:
    """One SwAV step on this rank's ``crops`` (n_crops × (B, 3, s_i, s_i), augmented,
    normalised, on the training device).

    A non-finite loss on any rank skips the step on every rank: one MAX all-reduce of a small
    flag vector decides, and the parameters, optimizer state, BatchNorm statistics and loss
    scale stay as they were.
    ``votes`` (shape (n,), FP32, on the device) are this rank's flags to agree on in that same
    all-reduce (the caller's stop and save requests), so agreeing costs no extra collective.

    Returns ``loss`` (this rank's, float; NaN/inf on a skipped step), ``loss_scale``,
    ``skipped`` (bool, the same on every rank) and ``votes`` (the agreed flags, floats).
    Host syncs: one, after backward has been queued (the agreement and the loss value).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    # BatchNorm statistics move in forward: kept to undo a skipped step (a few KiB per unit).
    buffers = list(model.buffers())
    before = [b.detach().clone() for b in buffers]
    # The last step's gradients go before the forward: FSDP2 keeps them alive into the next
    # backward otherwise (the planner, like torchtitan's loop, counts none from the forward
    # on; on tiny at batch 4 they were the 1.1% by which the step exceeded its plan).
    optimizer.zero_grad(set_to_none=True)
    # Forward: each sharded unit is called once with every resolution group (one all-gather
    # per unit); scores are (n_crops · B, K), crop-major, in FP32.
    _, scores = model(crops)
    # Codes of crops 0 and 1 by distributed Sinkhorn (no gradient), swapped prediction loss.
    loss = swav_loss(scores, len(crops), cfg.loss)
    # Agree on a non-finite loss (and the caller's votes) without waiting for it here: the
    # all-reduce runs while backward is queued; its answer is needed only before the update.
    flags = (~torch.isfinite(loss.detach())).float().reshape(1)
    if votes is not None:
        flags = torch.cat([flags, votes.to(flags.device, torch.float32)])
    agreement = dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True)
    # Backward: gradients reduce-scattered to their shards in FP32; FP16 scales the loss.
    scaler.scale(loss).backward()
    agreement.wait()
    # The step's one host sync: the agreed flags and this rank's loss in one copy.
    *agreed, loss_value = torch.cat([flags, loss.detach().float().reshape(1)]).tolist()
    skipped = agreed[0] > 0
    if skipped:
        # Some rank's loss is NaN/inf: its gradients poison every shard through the
        # reduce-scatter, so no rank steps. The scaler is untouched (it did not unscale).
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, old in zip(buffers, before, strict=True):
                b.copy_(old)
    else:
        if iteration < cfg.freeze_prototypes_iters:
            model.prototypes.weight.grad = None  # prototypes frozen early on (SwAV)
        # LARC (one all-reduce of 2L norms) + SGD; GradScaler unscales first and skips the
        # step on every rank if any rank saw an inf gradient.
        scaler.step(optimizer)
        scaler.update()
        normalize_prototypes(model)
    return {
        "loss": loss_value,
        "loss_scale": scaler.get_scale() if scaler.is_enabled() else 1.0,
        "skipped": skipped,
        "votes": agreed[1:],
    }
