"""planner: per-unit activation memory and checkpoint plans for a chain of units.

Profile one training step (symbolic on ``meta``, or measured), model per-rank memory for any
checkpoint segmentation, and solve for the plan with the least recomputation that fits::

    profile = profile_model(get_model_spec("regnet10b"), 16, dtype="fp16")   # meta: no memory
    plan = plan_checkpoints(profile, 40 * 2**30, MemoryConfig(world_size=8, sharded=True))
    plan.segments   # ((0, 6, True), (6, 21, True), (21, 28, False))

:mod:`planner.oracle` checks predictions against PyTorch's ``MemTracker`` / ``FSDPMemTracker``
and verifies plans (``plan_checkpoints(..., verify=tracker_verifier(...)[0])``);
:func:`recompute_lower_bound` says how little any plan could recompute.
"""

from .bound import recompute_lower_bound
from .measure import MeasuredStep, measure_step
from .memory import MemoryConfig, MemoryEstimate, estimate, held_input_bytes, static_floor_bytes
from .oracle import fsdp_memtracker_peak, memtracker_peak, tracker_verifier
from .plan import Plan, make_plan
from .profile import (
    DTYPES,
    ModelProfile,
    SelVariant,
    UnitProfile,
    emulate_mixed_precision,
    profile_model,
)
from .solve import (
    OBJECTIVES,
    UnitCosts,
    minmax_partition,
    plan_checkpoints,
    solve_minmax,
    solve_recompute,
    solve_selective,
    sqrt_segments,
)
from .tracker import LiveMemory

__all__ = [
    "DTYPES",
    "OBJECTIVES",
    "LiveMemory",
    "MeasuredStep",
    "MemoryConfig",
    "MemoryEstimate",
    "ModelProfile",
    "Plan",
    "SelVariant",
    "UnitCosts",
    "UnitProfile",
    "emulate_mixed_precision",
    "estimate",
    "fsdp_memtracker_peak",
    "held_input_bytes",
    "make_plan",
    "measure_step",
    "memtracker_peak",
    "minmax_partition",
    "plan_checkpoints",
    "profile_model",
    "recompute_lower_bound",
    "solve_minmax",
    "solve_recompute",
    "solve_selective",
    "sqrt_segments",
    "static_floor_bytes",
    "tracker_verifier",
]
