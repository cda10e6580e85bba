"""Measure the real peak of one training step with a plan applied, to check predictions.

The step is the steady state of training: forward, backward, optimizer step and
``zero_grad``, after one warm-up step that creates the optimizer state. On CPU (and meta) the
peak comes from :class:`~planner.tracker.LiveMemory` over the real tensors; on CUDA from
``torch.cuda.max_memory_allocated`` (the allocator's view, which also sees workspaces).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_leaves

from kitcore import ModelSpec

from ._wrapper import SelectiveSpec, apply_checkpointing
from .tracker import LiveMemory

__all__ = ["MeasuredStep", "measure_step"]


@dataclass(frozen=True, slots=True)
class MeasuredStep:
    """``peak_bytes``: the step's peak; ``timeline``: ``(seconds since the step began, live
    bytes)`` after each allocation or free (CPU and meta only)."""

    peak_bytes: int
    device: str
    timeline: list[tuple[float, int]]
    extra: dict[str, int] = field(default_factory=dict)


def _nvml_used_bytes(index: int) -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(
                pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used
            )
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library or no device: the allocator's figures stand alone
        return None


def sgd(model: torch.nn.Module, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer every measurement steps: SGD with momentum 0.9 (one FP32 state element
    per parameter), as SEER trains."""
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=weight_decay)


def training_step(spec: ModelSpec, model, opt, inputs):
    """The step every measurement runs: forward, ``spec``'s loss, backward, optimizer step,
    ``zero_grad(set_to_none=True)`` (so gradients appear during backward, as in training)."""

    def step() -> None:
        loss = spec.training_loss(model(inputs))
        loss.backward()
        del loss
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure_step(
    spec: ModelSpec,
    batch_size: int,
    segments: Sequence[tuple[int, int, bool]],
    *,
    device: str = "cpu",
    weight_decay: float = 1e-5,
    timeline: bool = False,
    seed: int = 0,
    selective: SelectiveSpec = (),
) -> MeasuredStep:
    """Peak bytes of a steady-state FP32 step of ``spec`` with ``segments`` checkpointed (and
    ``selective`` units under op-level selective checkpointing), using SGD (momentum 0.9,
    ``weight_decay``) as SEER does."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = spec.build_model(dev).train()
    apply_checkpointing(spec, model, segments, selective)
    opt = sgd(model, weight_decay)
    inputs = spec.example_input(batch_size, dev)

    step = training_step(spec, model, opt, inputs)
    step()  # warm-up: momentum buffers exist from now on
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize(dev)
        extra = {"max_reserved_bytes": torch.cuda.max_memory_reserved(dev)}
        used = _nvml_used_bytes(dev.index or 0)
        if used is not None:  # the device's view: context, allocator cache, other processes
            extra["nvml_used_bytes"] = used
        return MeasuredStep(torch.cuda.max_memory_allocated(dev), str(dev), [], extra)
    tracker = LiveMemory()
    state = [t for st in opt.state.values() for t in tree_leaves(st) if torch.is_tensor(t)]
    tracker.register([*model.parameters(), *model.buffers(), *tree_leaves(inputs), *state])
    points: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    if timeline:
        tracker.on_update = lambda live: points.append((time.perf_counter() - t0, live))
    with tracker:
        step()
    tracker.on_update = None  # frees after the step (the model going away) are not part of it
    return MeasuredStep(tracker.peak, str(dev), points)
