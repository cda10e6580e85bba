"""planner: per-unit activation memory and checkpoint plans for a chain of units.

Profile one training step (symbolic on ``meta``, or measured), model per-rank memory for any
checkpoint segmentation, and solve for the plan with the least recomputation that fits::

    profile = profile_model(get_model_spec("regnet10b"), 16, dtype="fp16")   # meta: no memory
    plan = plan_checkpoints(profile, 40 * 2**30, MemoryConfig(world_size=8, sharded=True))
    plan.segments   # ((0, 6, True), (6, 21, True), (21, 28, False))
"""

from .measure import MeasuredStep, measure_step
from .memory import MemoryConfig, MemoryEstimate, estimate, static_floor_bytes
from .plan import Plan, make_plan
from .profile import DTYPES, ModelProfile, UnitProfile, emulate_mixed_precision, profile_model
from .solve import (
    OBJECTIVES,
    minmax_partition,
    plan_checkpoints,
    solve_minmax,
    solve_recompute,
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
    "UnitProfile",
    "emulate_mixed_precision",
    "estimate",
    "make_plan",
    "measure_step",
    "minmax_partition",
    "plan_checkpoints",
    "profile_model",
    "solve_minmax",
    "solve_recompute",
    "sqrt_segments",
    "static_floor_bytes",
]
