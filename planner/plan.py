"""The checkpoint plan: a frozen, JSON-serialisable result that the FSDP wrapper consumes."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kitcore import FsdpkitError, write_text_atomic

from ._wrapper import SelectiveSpec, selective_items
from .devices import DEFAULT_GPU
from .memory import MemoryConfig, Segment, estimate
from .profile import ModelProfile, segment_recompute

__all__ = ["Plan", "make_plan"]

# MemoryConfig fields a plan records as part of its setup (besides its own top-level fields).
_SETUP_KEYS = ("optimizer", "weight_decay", "reduce_dtype", "prefetch", "reshard_after_forward",
               "batchnorm")  # fmt: skip

# Keys that reports add around a plan (derived properties, and what ``fsdpkit plan --json``
# prints beside it); reading a plan skips them, any other unknown key is an error.
_REPORT_KEYS = frozenset(
    {
        "fits",
        "recompute_fraction",
        "budget_source",
        "largest_batch_that_fits",
        "world_size_needed",
        "verification",
        "recompute_time_fraction",
        "choices",
        "selective_rule",
    }
)

# What a selective threshold above 0 means (kitcore.selective.keeps): a score over every
# candidate operator. Plans without it were written when it meant convolution intensity.
SELECTIVE_RULE = "score"


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """Which segments of a model's unit chain are checkpointed, and what that costs.

    ``segments``: ``(start, end_exclusive, checkpointed)`` tiling ``units`` (module names).
    Bytes are per rank; ``peak_bytes`` and ``breakdown`` are the memory model's prediction at
    the step's peak; ``recompute_flops`` are the forward FLOPs run again in backward, and
    ``step_flops`` the FLOPs of a plain step (forward + backward). ``selective``: units (indices,
    in plain segments) under op-level selective checkpointing; ``selective_min_intensity``:
    per selective unit, in the same order, its keep rule (0: the outputs of convolutions,
    products and attention; above 0: every operator whose recompute time per byte kept scores
    at least that many FLOPs per byte; empty: all 0; see :func:`kitcore.selective.keeps`).
    ``recompute_time_s`` and ``step_time_s``: roofline seconds of the recomputation and of a
    plain step on ``cost_device`` (:mod:`planner.devices`), what the solver minimised; 0 where
    the profile has no operator costs. ``verified_peak_bytes``:
    the peak a memory tracker measured for this plan (None: not verified), which took
    ``verify_time_s`` seconds.
    """

    model: str
    objective: str
    units: tuple[str, ...]
    segments: tuple[Segment, ...]
    activation_bytes: tuple[int, ...]
    batch_size: int
    dtype: str
    world_size: int
    sharded: bool
    budget_bytes: int
    peak_bytes: int
    peak_event: str
    peak_bytes_without_checkpointing: int
    breakdown: Mapping[str, int]
    breakdown_without_checkpointing: Mapping[str, int]
    recompute_flops: int
    step_flops: int
    solver_time_s: float
    max_segment_bytes: int | None = None
    notes: tuple[str, ...] = field(default=())
    verified_peak_bytes: int | None = None
    verify_time_s: float = 0.0
    config: Mapping[str, Any] = field(default_factory=dict)
    selective: tuple[int, ...] = ()
    selective_min_intensity: tuple[float, ...] = ()
    cost_device: str = ""
    recompute_time_s: float = 0.0
    step_time_s: float = 0.0

    def setup(self) -> dict[str, Any]:
        """The training setup this plan was made for: model, batch, world size, dtypes, the
        FSDP policy's memory-relevant fields and the optimizer (what :meth:`check_setup`
        compares). Plans written before the setup was recorded give what they have."""
        return {
            "model": self.model,
            "batch_size": self.batch_size,
            "dtype": self.dtype,
            "world_size": self.world_size,
            "sharded": self.sharded,
            **{k: self.config[k] for k in _SETUP_KEYS if k in self.config},
        }

    def check_setup(self, origin: str = "plan", **actual: Any) -> None:
        """Raise :class:`FsdpkitError` with one line naming the first field of ``actual``
        (e.g. ``world_size=2, dtype="fp32"``) that differs from the setup the plan was made
        for, with both values. Fields the plan did not record are not checked."""
        recorded = self.setup()
        for key, value in actual.items():
            if key in recorded and recorded[key] != value:
                flag = "--" + key.replace("_", "-")
                raise FsdpkitError(
                    f"{origin} was made for {key} {recorded[key]!r}, this run has {value!r}: "
                    f"make a plan for this setup (fsdpkit plan ... {flag} {value})"
                )

    @property
    def fits(self) -> bool:
        """Predicted peak within budget, and so is the tracker's, when the plan was verified."""
        verified = self.verified_peak_bytes
        return self.peak_bytes <= self.budget_bytes and (
            verified is None or verified <= self.budget_bytes
        )

    @property
    def recompute_fraction(self) -> float:
        return self.recompute_flops / self.step_flops if self.step_flops else 0.0

    @property
    def recompute_time_fraction(self) -> float:
        """Roofline recompute time ÷ roofline time of a plain step (on ``cost_device``)."""
        return self.recompute_time_s / self.step_time_s if self.step_time_s else 0.0

    @property
    def selective_spec(self) -> list[tuple[int, float]]:
        """``selective`` as (unit, threshold) pairs, what the memory model and
        :func:`planner._wrapper.apply_checkpointing` take."""
        thresholds = self.selective_min_intensity or (0.0,) * len(self.selective)
        return list(zip(self.selective, thresholds, strict=True))

    def choices(self) -> list[str]:
        """Per unit: ``"keep"``, ``"selective"`` or ``"checkpoint"`` (in a segment)."""
        out = ["keep"] * len(self.units)
        for s, e, c in self.segments:
            if c:
                out[s:e] = ["checkpoint"] * (e - s)
        for i in self.selective:
            out[i] = "selective"
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["segments"] = [list(s) for s in self.segments]
        d["selective"] = list(self.selective)
        d["selective_min_intensity"] = list(self.selective_min_intensity)
        d.update(
            fits=self.fits,
            recompute_fraction=self.recompute_fraction,
            recompute_time_fraction=self.recompute_time_fraction,
            choices=self.choices(),
            selective_rule=SELECTIVE_RULE,
        )
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any], origin: str = "plan") -> Plan:
        try:
            kwargs = {k: v for k, v in data.items() if k not in _REPORT_KEYS}
            kwargs["units"] = tuple(kwargs["units"])
            kwargs["segments"] = tuple((int(s), int(e), bool(c)) for s, e, c in data["segments"])
            kwargs["activation_bytes"] = tuple(kwargs["activation_bytes"])
            kwargs["notes"] = tuple(kwargs.get("notes", ()))
            kwargs["config"] = dict(kwargs.get("config", {}))
            kwargs["selective"] = tuple(int(i) for i in kwargs.get("selective", ()))
            kwargs["selective_min_intensity"] = tuple(
                float(t) for t in kwargs.get("selective_min_intensity", ())
            )
            if kwargs["selective_min_intensity"] and len(kwargs["selective_min_intensity"]) != len(
                kwargs["selective"]
            ):
                raise ValueError("selective_min_intensity must have one entry per selective unit")
            old_rule = data.get("selective_rule") != SELECTIVE_RULE
            if old_rule and any(t > 0 for t in kwargs["selective_min_intensity"]):
                raise FsdpkitError(
                    f"{origin}: its selective thresholds are convolution intensities, as an "
                    "older fsdpkit wrote them; thresholds now score every operator: re-plan"
                )
            return cls(**kwargs)
        except (KeyError, TypeError, ValueError) as e:
            raise FsdpkitError(f"{origin}: not an fsdpkit plan ({type(e).__name__}: {e})") from None

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            return cls.from_json(json.loads(Path(path).read_text()), str(path))
        except (OSError, json.JSONDecodeError) as e:
            raise FsdpkitError(f"{path}: cannot read plan: {e}") from None


def make_plan(
    prof: ModelProfile,
    segments: Sequence[Segment],
    cfg: MemoryConfig,
    *,
    budget_bytes: int,
    objective: str,
    solver_time_s: float = 0.0,
    max_segment_bytes: int | None = None,
    notes: Sequence[str] = (),
    verified_peak_bytes: int | None = None,
    verify_time_s: float = 0.0,
    selective: SelectiveSpec = (),
    device: str = DEFAULT_GPU,
) -> Plan:
    """Evaluate ``segments`` (and ``selective`` units: indices or (index, threshold) pairs)
    with the memory model and wrap the result as a :class:`Plan`; recomputation priced on
    ``device``."""
    n = len(prof.units)
    selective = sorted(selective_items(selective))
    est = estimate(prof, list(segments), cfg, selective)
    plain = estimate(prof, [(0, n, False)], cfg)
    segs = tuple((s, e, c) for s, e, c in segments)
    timed = device in prof.step_time_s and all(device in u.fwd_time_s for u in prof.units)
    return Plan(
        model=prof.model,
        objective=objective,
        units=tuple(prof.unit_names),
        segments=segs,
        activation_bytes=tuple(u.activation_bytes for u in prof.units),
        batch_size=prof.batch_size,
        dtype=prof.dtype,
        world_size=cfg.world_size,
        sharded=cfg.sharded,
        budget_bytes=budget_bytes,
        peak_bytes=est.peak_bytes,
        peak_event=est.peak_event,
        peak_bytes_without_checkpointing=plain.peak_bytes,
        breakdown=est.breakdown,
        breakdown_without_checkpointing=plain.breakdown,
        recompute_flops=sum(segment_recompute(prof, s, e) for s, e, c in segs if c)
        + sum(prof.units[i].sel_terms(t).recompute_flops for i, t in selective),
        step_flops=prof.step_flops,
        solver_time_s=solver_time_s,
        max_segment_bytes=max_segment_bytes,
        notes=tuple(notes),
        verified_peak_bytes=verified_peak_bytes,
        verify_time_s=verify_time_s,
        config=asdict(cfg),
        selective=tuple(i for i, _ in selective),
        selective_min_intensity=tuple(t for _, t in selective)
        if any(t for _, t in selective)
        else (),
        cost_device=device if timed else "",
        recompute_time_s=_recompute_seconds(prof, segs, selective, device) if timed else 0.0,
        step_time_s=prof.step_time_s.get(device, 0.0),
    )


def _recompute_seconds(
    prof: ModelProfile, segments: Sequence[Segment], selective: SelectiveSpec, device: str
) -> float:
    full = sum(segment_recompute(prof, s, e, device) for s, e, c in segments if c)
    sel = selective_items(selective)
    return full + sum(prof.units[i].sel_terms(t).recompute_time_s[device] for i, t in sel)
