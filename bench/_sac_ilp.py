"""``torch.distributed._tools.sac_ilp`` as a peer of the planner, run end to end on CPU.

PyTorch ships the estimators and the MILP; it ships no applier. This file runs them as their
tests do and applies the answer with ``torch.utils.checkpoint``'s public selective API:

1. statistics of one step on fake CPU tensors (nothing allocated): ``MemTracker``,
   ``RuntimeEstimator`` and ``SACEstimator`` in ``operator-level-cost-model`` mode, i.e. torch's
   roofline. That mode asks CUDA for the device's peak FLOP/s and memory bandwidth; here the
   named device of :mod:`planner.devices` answers instead (the figures our planner prices
   with), so both planners rank by the same device;
2. ``sac_milp`` over the units the planner chooses among (``ac_units``): which units to
   checkpoint and what share of each one's activation memory to discard;
3. per chosen unit, ``get_optimal_checkpointing_policy_per_module`` (torch's per-op MILP)
   turns the share into save/recompute per operator, applied as a ``MUST_SAVE`` /
   ``PREFER_RECOMPUTE`` policy, indexed in the operator order ``SACEstimator`` recorded.

Adaptations, each about torch's tools assuming things these models do not:
``parse_module_info`` assumes every module runs once per forward; blocks that call one
``nn.ReLU`` three times list it three times, so module orders keep each name's first
occurrence. The trade-off fit divides by a module's bytes; modules whose operators make none
(reshaping wrappers in transformers' models) are left out of the choice. And ``sac_milp``'s
``memory_budget`` is its own peak model's (no optimizer state, no inputs), so callers sweep
it and measure what each answer really peaks at.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import torch
from torch import nn

from planner.devices import Device
from planner.measure import sgd, training_step

GIB = 2**30


@contextmanager
def _named_roofline(device: Device):
    """torch's roofline (``torch.utils._runtime_estimation``) priced on ``device``."""
    import torch.utils._runtime_estimation as rte

    def tflops(dtype: torch.dtype) -> float:
        return device.peak_flops("fp32" if dtype == torch.float32 else "fp16") / 1e12

    with (
        mock.patch.object(rte, "get_device_tflops", tflops),
        mock.patch.object(rte, "get_gpu_dram_gbps", lambda: device.bandwidth / 1e9),
        # RuntimeEstimator._roofline_estimate asserts CUDA only to reach the two queries above
        mock.patch("torch.cuda.is_available", lambda: True),
    ):
        yield


@dataclass
class SacIlpStats:
    """What ``sac_milp`` and the per-op MILP read: the module graph and per-module SAC stats."""

    graph: object  # torch.distributed._tools.ilp_utils.Graph
    sac_stats: dict  # fqn (with the root's class name) -> SACStats
    root: str  # the root's name in those FQNs
    baseline_peak_bytes: int  # sac_ilp's own model of the plain step's peak
    units: list[str]  # the spec's units, as FQNs of the graph


def collect(spec, batch: int, device: Device) -> SacIlpStats:
    """Run torch's three estimators over one step of ``spec`` on fake CPU tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools import MemTracker, RuntimeEstimator, SACEstimator
    from torch.distributed._tools.ilp_utils import (
        aggregate_stats,
        get_peak_memory_runtime_baseline,
        parse_module_info,
    )

    cpu, mode = torch.device("cpu"), "operator-level-cost-model"
    torch.manual_seed(0)
    model = spec.build_model("meta").train()
    with FakeTensorMode(allow_non_fake_inputs=True), _named_roofline(device):
        model.to_empty(device=cpu)
        opt, x = sgd(model, 1e-5), spec.example_input(batch, cpu)
        step = training_step(spec, model, opt, x)
        step()  # optimizer state exists from here on, as in training
        mt = MemTracker()
        mt.track_external(model, opt)
        with mt:
            step()
        rt = RuntimeEstimator()
        with rt(estimate_mode_type=mode):
            step()
        sac = SACEstimator()
        with sac(estimate_mode_type=mode):
            loss = spec.training_loss(model(x))
        loss.backward()
        opt.zero_grad(set_to_none=True)
        # a module whose operators make no bytes (a reshaping wrapper) has nothing to discard,
        # and torch's trade-off fit divides by its total: leave it out of the choice
        for fqn in [k for k, v in sac.sac_mod_stats.items() if sum(v.memory) == 0]:
            del sac.sac_mod_stats[fqn], sac.sac_mod_greedy_order_meta[fqn]
        info = aggregate_stats(model, mt, rt, sac, cpu)
    orders = info["mod_order"]
    for key in orders:  # a module called twice is listed twice; the parser wants it once
        orders[key] = list(dict.fromkeys(orders[key]))
    graph = parse_module_info(info)
    root = graph.nodes[0]["fqn"]
    peak, _ = get_peak_memory_runtime_baseline(graph)
    units = [f"{root}.{name}" for name, _ in spec.named_units(model)]
    return SacIlpStats(graph, dict(sac.sac_mod_stats), root, int(peak), units)


def solve(stats: SacIlpStats, budget_bytes: int) -> dict[str, list[int]] | None:
    """``sac_milp`` at ``budget_bytes`` (its own peak model), then torch's per-op MILP per
    chosen unit: unit name (relative to the model) -> save (1) / recompute (0) per operator.
    None when either MILP finds no solution."""
    import torch.distributed._tools.sac_ilp as sac_ilp

    decisions, _, peak = sac_ilp.sac_milp(stats.graph, budget_bytes / GIB, ac_units=stats.units)
    if peak < 0:
        return None
    prefix = stats.root + "."
    # An operator with no bytes and no time (``aten.empty``) is in no constraint, so CBC
    # leaves its variable unset and torch's ``round(x.varValue)`` fails on None: recompute it.
    with mock.patch.object(sac_ilp, "round", _round_unset, create=True):
        policies = {
            fqn.removeprefix(prefix): sac_ilp.get_optimal_checkpointing_policy_per_module(
                stats.sac_stats[fqn], memory_budget=max(0.0, 1.0 - discard)
            )
            for fqn, discard in decisions.items()
        }
    # torch's per-op MILP returns [] when CBC finds no solution in its 10 s limit
    if any(not save for save in policies.values()):
        return None
    return policies


def _round_unset(value: float | None) -> int:
    return 0 if value is None else round(value)


def _policy_fn(save: list[int]):
    """A SAC policy that saves operator *i* (in ``SACEstimator``'s order) iff ``save[i]``.
    torch >= 2.13 asks only in forward; older ones ask again in recompute, counted apart."""
    from torch.distributed._tools.sac_estimator import OPS_TO_ALWAYS_SKIP
    from torch.utils.checkpoint import CheckpointPolicy

    counters = {False: itertools.count(), True: itertools.count()}

    def policy(ctx, func, *args, **kwargs):
        if func in OPS_TO_ALWAYS_SKIP:  # SACEstimator does not list them
            return CheckpointPolicy.PREFER_RECOMPUTE
        i = next(counters[ctx.is_recompute])
        if i >= len(save):
            raise RuntimeError(
                f"operator {i} ({func}) is past the {len(save)} SACEstimator recorded: "
                "the module ran other operators than when it was measured"
            )
        return CheckpointPolicy.MUST_SAVE if save[i] else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply(model: nn.Module, policies: dict[str, list[int]]) -> None:
    """Checkpoint each named submodule of ``model`` with its per-operator policy."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    for name, save in policies.items():
        module = model.get_submodule(name)
        forward = module.forward

        def run(*args, _forward=forward, _save=save, **kwargs):
            def contexts():
                # torch's per-op MILP saves an in-place op with its parent (``relu_`` on a
                # kept BatchNorm output), so kept entries are mutated by design
                return create_selective_checkpoint_contexts(
                    _policy_fn(_save), allow_cache_entry_mutation=True
                )

            return checkpoint(_forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)

        module.forward = run
