"""What would fit when nothing does: the largest per-rank batch with a feasible plan."""

from __future__ import annotations

import dataclasses

from kitcore import ModelSpec

from .memory import MemoryConfig
from .profile import ModelProfile, UnitProfile, profile_model
from .solve import solve_recompute

__all__ = ["largest_batch", "scale_profile"]

_UNIT_SCALED = [f.name for f in dataclasses.fields(UnitProfile) if f.name.endswith("_bytes")]
# op-level selective terms are dropped, not scaled (see scale_profile)
_UNIT_SCALED = [f for f in _UNIT_SCALED if f != "param_bytes" and not f.startswith("sel_")]
_UNIT_SCALED += ["flops"]
_NO_SELECTIVE = {"sel_saved_bytes": None, "sel_bwd_peak_bytes": None, "sel_variants": ()}
_MODEL_SCALED = [
    "pre_saved_bytes", "pre_peak_bytes", "tail_saved_bytes", "tail_saves_input_bytes",
    "tail_fwd_peak_bytes", "tail_bwd_peak_bytes", "step_flops", "input_bytes",
]  # fmt: skip


def scale_profile(prof: ModelProfile, batch_size: int) -> ModelProfile:
    """``prof`` with activation bytes and FLOPs scaled linearly to ``batch_size``.

    Exact for per-sample activations; it also scales what does not grow with the batch (e.g.
    parameter gradients inside backward peaks), so it overestimates when scaling up and
    underestimates when scaling down: confirm with a real profile. Op-level selective terms
    are dropped (they are for whole-unit plans: :func:`largest_batch`).
    """
    r = batch_size / prof.batch_size

    def scale(obj, names, **more):
        return dataclasses.replace(obj, **{n: round(getattr(obj, n) * r) for n in names}, **more)

    units = tuple(scale(u, _UNIT_SCALED, **_NO_SELECTIVE) for u in prof.units)
    out = scale(prof, _MODEL_SCALED)
    static = prof.static_bytes - prof.input_bytes + out.input_bytes
    return dataclasses.replace(
        out, units=units, batch_size=batch_size, static_bytes=static, source="scaled"
    )


def largest_batch(
    prof: ModelProfile, cfg: MemoryConfig, budget_bytes: int, spec: ModelSpec | None = None
) -> int | None:
    """Largest batch below ``prof.batch_size`` with a plan that fits (None if even 1 fails).

    Binary search on scaled profiles, then confirmed (and walked down if needed) with real
    symbolic profiles when ``spec`` is given.
    """
    if prof.batch_size < 2:
        return None

    def fits(b: int, real: bool) -> bool:
        if not real:
            return solve_recompute(scale_profile(prof, b), cfg, budget_bytes) is not None
        p = profile_model(spec, b, dtype=prof.dtype, selective=False)  # whole units only
        return solve_recompute(p, cfg, budget_bytes) is not None

    lo, hi = 0, prof.batch_size  # fits(lo) assumed, fits(hi) known false
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid, real=False) else (lo, mid)
    b = lo
    if spec is not None:
        while b >= 1 and not fits(b, real=True):
            b -= 1
    return b or None
