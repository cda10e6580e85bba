"""Independent checks of the memory model: PyTorch's own memory trackers, which no one here wrote.

- :func:`memtracker_peak`: one process, ``torch.distributed._tools.mem_tracker.MemTracker`` over
  a steady-state FP32 step (forward, backward, SGD step, ``zero_grad``) with a plan applied by
  :func:`fsdpkit.apply_ac`, under ``FakeTensorMode`` on CPU (nothing allocated) or on a device;
- :func:`fsdp_memtracker_peak`: FSDP2, ``FSDPMemTracker`` over the same step of rank 0 of a
  fake process group, under ``FakeTensorMode`` (no communication, no memory): the model
  checkpointed and sharded by :func:`fsdpkit.parallelize` as training does.

Both return bytes at the step's peak, comparable with :func:`planner.estimate` for
``MemoryConfig(sharded=False)`` / ``MemoryConfig(world_size=ws, sharded=True)`` with no
overhead. They are the verifiers of :func:`planner.plan_checkpoints` (``verify=``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch.utils._pytree import tree_leaves

from kitcore import FsdpkitError, FSDPPolicy, ModelSpec

from ._wrapper import SelectiveSpec, apply_checkpointing, shard_like_training
from .measure import sgd, training_step

__all__ = ["fsdp_memtracker_peak", "fsdp_step_tracker", "memtracker_peak", "tracker_verifier"]


def memtracker_peak(
    spec: ModelSpec,
    batch_size: int,
    segments: Sequence[tuple[int, int, bool]],
    *,
    selective: SelectiveSpec = (),
    device: str = "fake",
    weight_decay: float = 1e-5,
    breakdown: dict | None = None,
) -> int:
    """Peak bytes of one steady-state FP32 step of ``spec`` (one process, SGD with momentum,
    ``segments`` checkpointed and ``selective`` units under op-level selective checkpointing, by
    :func:`fsdpkit.apply_ac`) as ``MemTracker`` counts them.

    ``device="fake"`` (default): CPU tensors under ``FakeTensorMode``, so that every op picks
    the kernel a real CPU run picks (``meta`` would take, e.g., the math path of
    ``scaled_dot_product_attention``, which saves the attention matrix) and nothing is
    allocated; ``"meta"``, ``"cpu"``, ``"cuda"``: tensors there."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    fake = device == "fake"
    dev = torch.device("cpu" if fake else device)
    torch.manual_seed(0)
    model = spec.build_model("meta" if fake else dev).train()
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        if fake:
            model.to_empty(device=dev)  # memory is what is measured; values do not matter
        apply_checkpointing(spec, model, segments, selective)
        opt = sgd(model, weight_decay)
        inputs = spec.example_input(batch_size, dev)

        step = training_step(spec, model, opt, inputs)
        step()  # warm-up: the momentum buffers exist from now on, as in training
        tracker = MemTracker()
        leaves = [t for t in tree_leaves(inputs) if torch.is_tensor(t)]
        tracker.track_external(model, opt, *leaves)
        with tracker:
            step()
    return _peak(tracker, dev, breakdown)


def _peak(tracker, dev: torch.device, breakdown: dict | None) -> int:
    snap = tracker.get_tracker_snapshot("peak")[dev]
    if breakdown is not None:  # the tracker's categories at the peak, for reports
        breakdown.update({str(getattr(k, "value", k)): int(v) for k, v in snap.items() if v})
    return int(snap["Total"])


def fsdp_memtracker_peak(
    spec: ModelSpec,
    batch_size: int,
    segments: Sequence[tuple[int, int, bool]],
    *,
    selective: SelectiveSpec = (),
    world_size: int,
    dtype: str = "fp32",
    prefetch: int = 1,
    weight_decay: float = 1e-5,
    breakdown: dict | None = None,
) -> int:
    """Peak bytes of rank 0 in one steady-state step of ``spec`` under FSDP2 at ``world_size``
    (units in ``dtype``, BatchNorm replicated in FP32 as :class:`fsdpkit.FSDPPolicy` defaults),
    as ``FSDPMemTracker`` counts them: fake process group, ``FakeTensorMode`` on CPU.

    Initialises (and destroys) the default process group: call it from a process that has
    none. ``breakdown`` (optional) receives the tracker's categories at the peak."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise FsdpkitError("fsdp_memtracker_peak needs a process without a process group")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (world_size,))  # real: the mesh reads its ranks
        model = spec.build_model("meta").train()  # some initialisers read values: not fake
        with FakeTensorMode(allow_non_fake_inputs=True):  # the meta model's tensors
            dev = torch.device("cpu")
            model.to_empty(device=dev)  # memory is what is measured; values do not matter
            policy = FSDPPolicy(param_dtype=dtype, prefetch=prefetch, sync_bn_group_size=-1)
            shard_like_training(spec, model, segments, mesh, policy, selective)
            opt = sgd(model, weight_decay)
            inputs = spec.example_input(batch_size, dev)

            step = training_step(spec, model, opt, inputs)
            step()
            tracker = fsdp_step_tracker(model, opt, inputs)
            with tracker:
                step()
            return _peak(tracker, dev, breakdown)
    finally:
        dist.destroy_process_group()


def fsdp_step_tracker(model, optimizer, inputs):
    """An ``FSDPMemTracker`` for one step of a model sharded with ``fully_shard``: the model's
    ``inputs`` (nested tensors) counted from the start, and so are the parameters FSDP does
    not manage (replicated BatchNorm, ``fully_shard``'s ignored_params), which it would count
    only once the optimizer steps although they exist through the whole step (filed under
    "Inputs", the one category of external tensors it sums). Enter it around the step."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.tensor import DTensor

    tracker = FSDPMemTracker(model, optimizer)
    plain = [p for p in model.parameters() if not isinstance(p, DTensor)]
    leaves = [t for t in tree_leaves(inputs) if torch.is_tensor(t)]
    tracker.track_inputs((*leaves, *plain))
    return tracker


def tracker_verifier(spec: ModelSpec, batch_size: int, cfg, dtype: str = "fp32"):
    """``verify(segments, selective=()) -> peak bytes`` for :func:`planner.plan_checkpoints`:
    the tracker that matches ``cfg`` (``FSDPMemTracker`` when sharded, else ``MemTracker``,
    which runs FP32 only), plus ``cfg.overhead_bytes``, which no tracker sees. Returns
    ``(verify, name)``."""
    if cfg.sharded:

        def verify(segments, selective=()) -> int:
            peak = fsdp_memtracker_peak(
                spec, batch_size, segments, selective=selective, world_size=cfg.world_size,
                dtype=dtype, prefetch=cfg.prefetch,
            )  # fmt: skip
            return peak + cfg.overhead_bytes

        return verify, "FSDPMemTracker"
    if dtype != "fp32":
        raise FsdpkitError(
            f"verifying a one-process plan runs the step in fp32; plan it with --dtype fp32 "
            f"(got {dtype}) or with FSDP"
        )

    def verify_one(segments, selective=()) -> int:
        return memtracker_peak(spec, batch_size, segments, selective=selective) + (
            cfg.overhead_bytes
        )

    return verify_one, "MemTracker"
