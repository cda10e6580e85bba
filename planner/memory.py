"""Per-rank memory model: the peak of one training step for any checkpoint segmentation.

A plan splits the unit chain into segments ``(start, end_exclusive, checkpointed)``. The model
replays the step from a :class:`~planner.profile.ModelProfile` as a sequence of events: the
forward of every unit, the recomputation of each checkpointed segment, every unit's backward,
and the optimizer step. Every event's bytes are

    static terms (parameters, gradients, optimizer state, unsharded buffers, inputs)
  + activations stored by everything before the current segment   (the *prefix*)
  + the current segment's own working set.

Only the last term depends on the segment, and the prefix only grows, so an exact dynamic
programme over segments (:mod:`planner.solve`) and this replay share one function,
:func:`segment_events`.

Boundary tensors (a unit's input/output) are counted once: a boundary is kept for backward if
the unit before it saves it (and is not checkpointed), the unit after it saves it (and is not
checkpointed), or a checkpointed segment starts there (its input is held).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kitcore import FsdpkitError, FSDPPolicy

from ._wrapper import SelectiveSpec, selective_items
from .fsdp2 import PRE_HELD, ShardedStatics
from .profile import DTYPES, ModelProfile, UnitProfile

__all__ = [
    "OPTIMIZERS",
    "Event",
    "MemoryConfig",
    "MemoryEstimate",
    "Segment",
    "estimate",
    "held_input_bytes",
    "normalize_segments",
    "segment_events",
    "static_floor_bytes",
    "tail_events",
    "unit_views",
]

Segment = tuple[int, int, bool]

# Optimizer state in FP32 elements per parameter, and step temporaries (see the docstring).
OPTIMIZERS = {"sgd": 1, "adamw": 2, "none": 0}


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryConfig:
    """How the step runs on one rank.

    world_size: data-parallel ranks sharing parameters, gradients and optimizer state.
    sharded: FSDP (parameters, gradients, optimizer state sharded over ``world_size``; each
        unit's parameters all-gathered in the profile's dtype just before use). ``False``: a
        plain single-process step (what the CPU accuracy measurements run).
    optimizer: ``sgd`` (momentum: 1 FP32 element per parameter; with weight decay its step
        allocates one parameter-sized temporary at a time), ``adamw`` (2 elements; its step
        allocates a full parameter-sized temporary), ``none``.
    weight_decay: whether the optimizer applies weight decay (SEER: yes).
    reduce_dtype: dtype gradients are reduce-scattered in (sharded only).
    prefetch: units all-gathered ahead of the current one (forward and backward).
    overhead_bytes: fixed per-rank overhead (CUDA context, communication buffers, allocator
        slack), stated in the breakdown.
    reshard_after_forward: (sharded) free each unit's un-sharded parameters after its forward;
        False keeps every unit's gathered from its forward until its backward is done.
    batchnorm: (sharded) ``"replicate"``: BatchNorm parameters whole on every rank in FP32,
        with their gradients and optimizer state; ``"units"``: sharded like the rest, but each
        BatchNorm's FP32 parameters stay gathered for the whole step (its units never reshard).

    :meth:`from_policy` reads these from the :class:`fsdpkit.FSDPPolicy` the wrapper applies,
    so the plan and the run cannot disagree.
    """

    world_size: int = 1
    sharded: bool = False
    optimizer: str = "sgd"
    weight_decay: bool = True
    reduce_dtype: str = "fp32"
    prefetch: int = 1
    overhead_bytes: int = 0
    reshard_after_forward: bool = True
    batchnorm: str = "replicate"

    @classmethod
    def from_policy(
        cls,
        policy: FSDPPolicy,
        world_size: int,
        *,
        optimizer: str = "sgd",
        weight_decay: bool = True,
        overhead_bytes: int = 0,
    ) -> MemoryConfig:
        """The step ``fsdpkit.parallelize(..., policy=policy)`` runs on ``world_size`` ranks:
        prefetch, reduce dtype, resharding and BatchNorm mode (``"auto"`` resolved as the
        wrapper resolves it) all come from ``policy``."""
        return cls(
            world_size=world_size,
            sharded=True,
            optimizer=optimizer,
            weight_decay=weight_decay,
            reduce_dtype=policy.reduce_dtype,
            prefetch=policy.prefetch,
            overhead_bytes=overhead_bytes,
            reshard_after_forward=policy.reshard_after_forward,
            batchnorm=policy.resolved_batchnorm(),
        )

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise FsdpkitError(f"world size must be >= 1, got {self.world_size}")
        if self.optimizer not in OPTIMIZERS:
            raise FsdpkitError(f"unknown optimizer {self.optimizer!r}; use {sorted(OPTIMIZERS)}")
        if self.reduce_dtype not in DTYPES:
            raise FsdpkitError(f"unknown reduce dtype {self.reduce_dtype!r}")
        if self.prefetch < 0 or self.overhead_bytes < 0:
            raise FsdpkitError("prefetch and overhead must be >= 0")
        if self.batchnorm not in ("replicate", "units"):
            raise FsdpkitError(f"batchnorm must be 'replicate' or 'units', got {self.batchnorm!r}")


ACT = "activations kept (plain units)"
CKPT_IN = "inputs of checkpointed segments"
RECOMP = "recomputed segment"
HELD = "unit inputs the model's code holds"
TEMP = "temporaries (unit working set, gradients in flight)"


@dataclass(frozen=True, slots=True)
class Event:
    """One moment of the step: ``label`` (e.g. ``"bwd 3"``), static terms by name, and the
    current segment's bytes by component (:data:`ACT`, :data:`CKPT_IN`, :data:`RECOMP`,
    :data:`TEMP`). The activations kept by earlier segments (the prefix) come on top."""

    label: str
    static: dict[str, int]
    parts: dict[str, int]

    @property
    def static_total(self) -> int:
        return sum(self.static.values())

    @property
    def local(self) -> int:
        return sum(self.parts.values())


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Predicted peak (bytes) of a plan, the breakdown at that moment, and the timeline:
    ``(event label, bytes, FLOPs the event runs)`` in step order (FLOPs stand in for time)."""

    peak_bytes: int
    peak_event: str
    breakdown: dict[str, int]
    timeline: list[tuple[str, int, int]] = field(repr=False)


def _elem(dtype: str) -> int:
    return DTYPES[dtype].itemsize


class _Statics:
    """Static terms per event position of a one-process step (sharded steps:
    :class:`planner.fsdp2.ShardedStatics`, same methods)."""

    sharded = False

    def __init__(self, prof: ModelProfile, cfg: MemoryConfig) -> None:
        self.p, self.c = prof, cfg
        n = len(prof.units)
        state = OPTIMIZERS[cfg.optimizer]
        self.base = {
            "parameters": prof.static_bytes - prof.input_bytes - prof.buffer_bytes,
            "optimizer state": 4 * state * prof.param_numel,
            "inputs and buffers": prof.input_bytes + prof.buffer_bytes,
            "fixed overhead": cfg.overhead_bytes,
        }
        # Gradients appear in backward (zero_grad(set_to_none) removed the last step's):
        # while unit i runs backward, those of units after i and of the tail exist.
        grads = [u.param_bytes for u in prof.units] + [prof.tail_param_bytes]
        self._grads_after = [sum(grads[i + 1 :]) for i in range(n + 1)]

    def pre(self) -> dict[str, int]:
        return dict(self.base)

    def fwd(self, i: int) -> dict[str, int]:
        """Static terms while unit ``i`` runs forward (``i == n``: the tail)."""
        s = dict(self.base)
        if self.p.pre_held_bytes:
            s[PRE_HELD] = self.p.pre_held_bytes
        return s

    def bwd(self, i: int, s: int | None = None, ckpt: bool = False) -> dict[str, int]:
        """Static terms while unit ``i`` runs backward (``i == n``: the tail)."""
        s_ = dict(self.base)
        s_["loss and its gradient"] = 2 * self.p.loss_bytes
        s_["gradients"] = self._grads_after[min(i, len(self.p.units))]
        return s_

    def recompute(self, k: int, s: int, e: int) -> dict[str, int]:
        return self.bwd(e - 1)

    def optimizer_step(self) -> dict[str, int]:
        s = dict(self.base)
        p, c = self.p, self.c
        s["gradients"] = p.param_bytes
        if c.optimizer == "adamw":
            s["optimizer temporaries"] = 4 * p.param_numel
        elif c.optimizer == "sgd" and c.weight_decay:  # one parameter-sized tensor at a time
            elem = 4 if p.dtype not in DTYPES else _elem(p.dtype)
            s["optimizer temporaries"] = elem * p.max_param_numel
        return s


def _statics(prof: ModelProfile, cfg: MemoryConfig) -> _Statics | ShardedStatics:
    if cfg.sharded:
        return ShardedStatics(prof, cfg, OPTIMIZERS[cfg.optimizer])
    return _Statics(prof, cfg)


def unit_views(prof: ModelProfile, selective: SelectiveSpec = ()) -> list[UnitProfile]:
    """The units as the memory model sees them: those in ``selective`` (indices, or (index,
    threshold) pairs) replaced by their op-level selective view
    (:meth:`~planner.profile.UnitProfile.selective`)."""
    units = list(prof.units)
    for i, t in selective_items(selective):
        units[i] = units[i].selective(t)
    return units


def _boundary_kept(
    prof: ModelProfile, k: int, ckpt: list[bool | None], start: bool, units: Sequence[UnitProfile]
) -> int:
    """Bytes of boundary ``k`` (input of unit k) kept for backward; ckpt[j] per unit."""
    if start:
        return units[k].input_bytes
    kept = 0
    if k >= 1 and ckpt[k - 1] is False:
        kept = max(kept, units[k - 1].saves_output_bytes)
    if k < len(units) and ckpt[k] is False:
        kept = max(kept, units[k].saves_input_bytes)
    if k == len(units):
        kept = max(kept, prof.tail_saves_input_bytes)
    return kept


def segment_events(
    prof: ModelProfile,
    statics: _Statics,
    s: int,
    e: int,
    ckpt: bool,
    prev_ckpt: bool | None,
    units: Sequence[UnitProfile] | None = None,
) -> tuple[tuple[int, int], list[Event]]:
    """Bytes segment ``[s, e)`` adds to the prefix as ``(plain activations, checkpoint
    inputs)``, and its events (forward, recompute, backward) with segment-local bytes.
    ``prev_ckpt``: type of unit ``s - 1`` (None for the first segment). ``units``: the views
    of :func:`unit_views` (a plain unit under selective checkpointing); default the profile's.
    """
    u = prof.units if units is None else units
    types: list[bool | None] = [None] * len(u)
    if s > 0:
        types[s - 1] = prev_ckpt
    for i in range(s, e):
        types[i] = ckpt
    kept = [_boundary_kept(prof, k, types, ckpt and k == s, u) for k in range(s, e)]
    inner = [max(u[k - 1].saves_output_bytes, u[k].saves_input_bytes) for k in range(s + 1, e)]
    held = kept[0] if ckpt else 0  # the checkpointed segment's input
    events: list[Event] = []
    stored = 0
    for i in range(s, e):
        fwd = u[i].fwd_nograd_peak_bytes if ckpt else u[i].fwd_peak_bytes
        parts = {ACT: stored, CKPT_IN: held if i > s else 0, TEMP: u[i].input_bytes + fwd}
        if statics.sharded:  # before its copy-out: two all-gather outputs, no working set
            gather = {**parts, TEMP: u[i].input_bytes}
            events.append(Event(f"gather {i}", statics.enter(i), gather))
        events.append(Event(f"fwd {i}", statics.fwd(i), parts))
        if not ckpt:
            stored += kept[i - s] + u[i].saved_bytes
    grad_out = u[e - 1].output_bytes  # gradient of the segment's output
    if ckpt:  # recompute in grad mode, holding the input and the output gradient
        recomputed = 0
        for i in range(s, e):
            live_in = u[i].input_bytes if i > s else 0
            parts = {
                CKPT_IN: held,
                RECOMP: recomputed,
                TEMP: grad_out + live_in + u[i].fwd_peak_bytes,
            }
            events.append(Event(f"recompute {i}", statics.recompute(i, s, e), parts))
            recomputed += u[i].saved_bytes + (inner[i - s - 1] if i > s else 0)
    for i in range(e - 1, s - 1, -1):
        # Kept while unit i runs backward: units s..i-1 (recomputed if checkpointed) and the
        # boundaries s..i, unit i's own saves; in flight: its output gradient and temporaries.
        before = sum(u[j].saved_bytes for j in range(s, i))
        before += sum(inner[: i - s]) if ckpt else sum(kept[: i - s + 1])
        own = before + u[i].saved_bytes + u[i].saves_output_bytes
        parts = {
            RECOMP if ckpt else ACT: own,
            CKPT_IN: held,
            TEMP: u[i].output_bytes + u[i].bwd_peak_bytes + u[i].later_output_bytes,
        }
        events.append(Event(f"bwd {i}", statics.bwd(i, s, ckpt), parts))
        if statics.sharded:  # its reduce-scatter: saves and temporaries gone, input gradient
            parts = {
                RECOMP if ckpt else ACT: before,
                CKPT_IN: held,
                TEMP: u[i].input_bytes + u[i].later_output_bytes,
            }
            events.append(Event(f"reduce {i}", statics.reduce(i, s, ckpt), parts))
    return ((0, held) if ckpt else (stored, 0)), events


def tail_events(
    prof: ModelProfile,
    statics: _Statics,
    last_ckpt: bool,
    units: Sequence[UnitProfile] | None = None,
) -> tuple[int, list[Event]]:
    """Events after the last unit (heads, loss) and the optimizer step; bytes kept by the
    last boundary and the tail."""
    n = len(prof.units)
    types: list[bool | None] = [None] * n
    if n:
        types[-1] = last_ckpt
    kept = _boundary_kept(prof, n, types, False, prof.units if units is None else units)
    out_bytes = prof.units[-1].output_bytes if n else 0
    after_fwd = kept + prof.tail_saved_bytes
    events = [
        Event("fwd tail", statics.fwd(n), {TEMP: out_bytes + prof.tail_fwd_peak_bytes}),
        Event("bwd tail", statics.bwd(n), {ACT: after_fwd, TEMP: prof.tail_bwd_peak_bytes}),
    ]
    return after_fwd, events


def static_floor_bytes(prof: ModelProfile, cfg: MemoryConfig) -> int:
    """Bytes needed with no activations at all (the optimizer step); no plan goes below it."""
    return sum(_statics(prof, cfg).optimizer_step().values())


def normalize_segments(segments: list[Segment], n: int) -> list[Segment]:
    """Validate a segmentation of ``n`` units; merge adjacent non-checkpointed segments."""
    out: list[Segment] = []
    pos = 0
    for seg in segments:
        if len(seg) != 3:
            raise FsdpkitError(f"segment {seg!r}: expected [start, end_exclusive, checkpointed]")
        s, e, c = int(seg[0]), int(seg[1]), bool(seg[2])
        if s != pos or e <= s or e > n:
            raise FsdpkitError(
                f"segment {list(seg)} does not continue the chain at unit {pos} of {n}"
            )
        if out and not c and not out[-1][2]:
            out[-1] = (out[-1][0], e, False)
        else:
            out.append((s, e, c))
        pos = e
    if pos != n:
        raise FsdpkitError(f"segments cover units 0..{pos - 1} of {n}; they must cover all")
    return out


def check_selective(segments: Sequence[Segment], selective: SelectiveSpec, n: int) -> None:
    """Selective units must be distinct units of plain segments (a checkpointed segment
    already recomputes everything)."""
    plain = {i for s, e, c in segments if not c for i in range(s, e)}
    selective = [i for i, _ in selective_items(selective)]
    for i in selective:
        if not 0 <= i < n:
            raise FsdpkitError(f"selective unit {i} is not one of the {n} units")
        if i not in plain:
            raise FsdpkitError(
                f"unit {i} is both selective and in a checkpointed segment; choose one"
            )
    if len(set(selective)) != len(selective):
        raise FsdpkitError(f"selective units repeat: {sorted(selective)}")


_FORWARD = ("gather", "fwd")  # a unit's forward events (gather: sharded steps only)


def _event_flops(prof: ModelProfile, label: str) -> int:
    """FLOPs an event runs (a stand-in for its duration): backward costs twice the forward."""
    kind, _, where = label.partition(" ")
    if kind not in ("fwd", "bwd", "recompute"):
        return 0  # reduce-scatters, the optimizer step: communication and O(params) work
    units_fwd = sum(u.flops for u in prof.units)
    if where == "tail":
        fwd = max(prof.step_flops // 3 - units_fwd, 0)
    elif where.isdigit():
        fwd = prof.units[int(where)].flops
    else:
        return 0
    return 2 * fwd if kind == "bwd" else fwd


def held_input_bytes(
    prof: ModelProfile, segments: list[Segment], units: Sequence[UnitProfile] | None = None
) -> list[int]:
    """Per unit ``i``: bytes of earlier units' inputs that the model's own code still holds
    while unit ``i`` runs forward (``UnitProfile.input_held_until``) and that nothing else
    counts: a boundary a checkpointed segment does not save stays allocated all the same; and
    what the code between two units made and still holds (``between_held_bytes``)."""
    n = len(prof.units)
    types: list[bool | None] = [None] * n
    starts = set()
    for s, e, c in segments:
        types[s:e] = [c] * (e - s)
        if c:
            starts.add(s)
    held = [0] * n
    views = prof.units if units is None else units
    for b, u in enumerate(prof.units):
        if u.input_held_until <= b or b in starts:
            continue
        extra = u.input_bytes - _boundary_kept(prof, b, types, False, views)
        for i in range(b + 1, min(u.input_held_until, n - 1) + 1):
            held[i] += max(extra, 0)
    for b, u in enumerate(prof.units):  # made between units b-1 and b, held from b on
        for i in range(b, min(u.between_held_until, n - 1) + 1):
            held[i] += u.between_held_bytes
    return held


def estimate(
    prof: ModelProfile,
    segments: list[Segment],
    cfg: MemoryConfig,
    selective: SelectiveSpec = (),
) -> MemoryEstimate:
    """Replay one step under ``segments``: predicted peak, its breakdown, and the timeline.
    ``selective``: units (indices, in plain segments) under op-level selective checkpointing,
    or (index, threshold) pairs for a unit's variants that keep fewer operators.

    Order: pre-unit work, every segment's forward, the tail (heads, loss) forward and backward,
    segments' recomputation and backward in reverse, then the optimizer step.
    """
    n = len(prof.units)
    segments = normalize_segments(segments, n)
    check_selective(segments, selective, n)
    units = unit_views(prof, selective)
    statics = _statics(prof, cfg)
    timeline: list[tuple[tuple[int, int], Event]] = []
    timeline.append(((0, 0), Event("pre", statics.pre(), {TEMP: prof.pre_peak_bytes})))
    prefix = (prof.pre_saved_bytes, 0)  # (plain activations, checkpoint inputs) kept so far
    backward: list[tuple[tuple[int, int], list[Event]]] = []
    held = held_input_bytes(prof, segments, units)
    prev: bool | None = None
    for s, e, c in segments:
        stored, events = segment_events(prof, statics, s, e, c, prev, units)
        forward = [ev for ev in events if ev.label.split()[0] in _FORWARD]  # units s..e-1
        for ev in forward:
            i = int(ev.label.split()[1])
            parts = {**ev.parts, HELD: held[i]} if held[i] else ev.parts
            timeline.append((prefix, Event(ev.label, ev.static, parts)))
        backward.append((prefix, [ev for ev in events if ev.label.split()[0] not in _FORWARD]))
        prefix = (prefix[0] + stored[0], prefix[1] + stored[1])
        prev = c
    _, tail = tail_events(prof, statics, bool(prev), units)
    timeline += [(prefix, ev) for ev in tail]
    for seg_prefix, events in reversed(backward):
        timeline += [(seg_prefix, ev) for ev in events]
    if statics.sharded:
        timeline.append(((0, 0), Event("reduce root", statics.reduce(n), {})))
        timeline.append(((0, 0), Event("end of backward", statics.end_of_backward(), {})))
    timeline.append(((0, 0), Event("optimizer step", statics.optimizer_step(), {})))
    totals = [
        (ev.label, sum(pre) + ev.static_total + ev.local, _event_flops(prof, ev.label))
        for pre, ev in timeline
    ]
    k = max(range(len(totals)), key=lambda j: totals[j][1])
    pre, ev = timeline[k]
    breakdown = dict(ev.static)
    for name in (ACT, CKPT_IN, RECOMP, TEMP, HELD):
        breakdown[name] = ev.parts.get(name, 0)
    breakdown[ACT] += pre[0]
    breakdown[CKPT_IN] += pre[1]
    return MemoryEstimate(totals[k][1], ev.label, breakdown, totals)
