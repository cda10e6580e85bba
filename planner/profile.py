"""Per-unit memory and FLOPs profile of one training step, symbolic (meta) or measured.

One plain step (no checkpointing) runs under :class:`~planner.tracker.LiveMemory`, with hooks
at every unit boundary in forward and in backward, plus one forward without grad (what a
checkpointed segment runs). Per unit it records the facts the memory model composes into the
peak of any plan:

- ``saved_bytes``: storages autograd saves for backward (saved-tensor hooks, de-duplicated by
  storage), excluding parameters, buffers, model inputs and the unit's boundary tensors;
- ``input_bytes`` / ``output_bytes``: boundary tensors (all resolution groups), and how many of
  those bytes the unit itself saves (``saves_input_bytes`` / ``saves_output_bytes``), so a
  tensor that two neighbours both save is counted once;
- ``fwd_peak_bytes`` / ``fwd_nograd_peak_bytes``: the forward's peak above the live bytes at
  the unit's start (grad on / off);
- ``bwd_peak_bytes``: the backward's peak above the live bytes when its output gradient is
  complete (temporaries, gradients of inputs and parameters);
- ``flops`` (forward) and ``param_bytes``;
- ``stop_skip_flops`` / ``stop_skip_time_s``: what its forward runs after the last tensor it
  saves for backward (``saves_nothing``: it saves none). torch's non-reentrant checkpoint
  stops recomputing there (early stop), so a checkpointed segment ending with this unit never
  runs it again (:func:`segment_recompute`); a transformer layer ending ``x + fc2(h)`` skips
  ``fc2``, whose input is saved before it runs;
- ``input_held_until``: the last unit whose forward starts while this unit's input is still
  alive in a forward without grad, where nothing is saved for backward: the model's own code
  holds it (e.g. ``x = self.trunk(x)`` keeps the trunk's input until the trunk returns). -1:
  released when the unit is done. A checkpointed segment does not save such a tensor, yet it
  stays allocated until then; the memory model adds it to those forwards;
- ``between_held_bytes`` / ``between_held_until``: what the model's code makes after the
  previous unit's forward and still holds when this unit starts (not its input, not saved
  for backward), and the last unit whose forward starts while it is alive: transformers'
  Swin stage returns a reshaped copy of its output that the encoder's loop holds through the
  next stage;
- ``later_output_bytes``: a unit called once with several inputs (one per resolution group)
  returns several outputs; those after the first are counted as alive through the unit's
  whole backward. MemTracker sees them there (``tiny``: exactly that, on units 1-3), where
  the phase boundary the unit's hooks see does not; on units where they are already freed
  it over-counts by at most their bytes.

On ``meta`` nothing is allocated, so ``regnet10b`` at batch 16 profiles on a laptop.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_leaves

from kitcore import DTYPES, FsdpkitError, ModelSpec, write_text_atomic

from ._meta import (
    cast_inputs,
    emulate_mixed_precision,
    fused_attention_on_meta,
    sharded_param_views,
)
from .fsdp2 import shard_rows
from .opcost import OpCosts
from .sel_profile import (
    SEL_VARIANTS,
    SelVariant,
    selective_bwd_peaks,
    selective_fields,
    variant_thresholds,
)
from .trace import Trace, total_bytes
from .tracker import LiveMemory, storage_key, tensor_storages

__all__ = [
    "DTYPES",
    "ModelProfile",
    "SelVariant",
    "UnitProfile",
    "early_stop_savings",
    "emulate_mixed_precision",
    "profile_model",
    "recompute_terms",
    "segment_recompute",
]

_BN = _BatchNorm  # nn.BatchNorm*d, nn.SyncBatchNorm and fsdpkit.SyncBatchNorm alike


@dataclass(frozen=True, slots=True)
class UnitProfile:
    """What one unit costs in one training step (bytes, FLOPs); see the module docstring."""

    name: str
    saved_bytes: int
    input_bytes: int
    output_bytes: int
    saves_input_bytes: int
    saves_output_bytes: int
    fwd_peak_bytes: int
    fwd_nograd_peak_bytes: int
    bwd_peak_bytes: int
    flops: int
    param_bytes: int
    param_numel: int = 0
    input_held_until: int = -1
    later_output_bytes: int = 0
    between_held_bytes: int = 0
    between_held_until: int = -1
    sel_saved_bytes: int | None = None
    sel_saves_output_bytes: int = 0
    sel_recomputed_bytes: int = 0
    sel_recompute_flops: int = 0
    sel_bwd_peak_bytes: int | None = None
    fwd_time_s: Mapping[str, float] = field(default_factory=dict)
    sel_recompute_time_s: Mapping[str, float] = field(default_factory=dict)
    sel_variants: tuple[SelVariant, ...] = ()
    stop_skip_flops: int = 0
    stop_skip_time_s: Mapping[str, float] = field(default_factory=dict)
    saves_nothing: bool = False

    def __post_init__(self) -> None:
        variants = tuple(SelVariant(**v) if isinstance(v, Mapping) else v
                         for v in self.sel_variants)  # fmt: skip  # read back from JSON
        object.__setattr__(self, "sel_variants", variants)

    @property
    def activation_bytes(self) -> int:
        """Bytes this unit keeps for backward in a plain step (its saves, its input if kept)."""
        return self.saved_bytes + self.saves_input_bytes

    @property
    def has_selective(self) -> bool:
        """Whether the profile measured this unit under op-level selective checkpointing."""
        return self.sel_saved_bytes is not None

    @property
    def selective_thresholds(self) -> tuple[float, ...]:
        """The keep rules this unit was profiled under selective checkpointing with: 0.0
        (every kept operator) first, then its variants' score thresholds (FLOPs per byte)."""
        if not self.has_selective:
            return ()
        return (0.0, *(v.min_intensity for v in self.sel_variants))

    def sel_terms(self, min_intensity: float = 0.0) -> SelVariant:
        """The ``sel_*`` facts of this unit at threshold ``min_intensity`` (one of
        :attr:`selective_thresholds`)."""
        if self.sel_saved_bytes is None:
            raise FsdpkitError(f"unit {self.name}: profiled without selective checkpointing")
        if min_intensity <= 0:
            return SelVariant(0.0, self.sel_saved_bytes, self.sel_saves_output_bytes,
                              self.sel_recomputed_bytes, self.sel_recompute_flops,
                              self.sel_recompute_time_s, self.sel_bwd_peak_bytes)  # fmt: skip
        for v in self.sel_variants:
            if v.min_intensity == min_intensity:
                return v
        raise FsdpkitError(
            f"unit {self.name}: not profiled with selective threshold {min_intensity:g} FLOPs/B "
            f"(profiled: {', '.join(f'{t:g}' for t in self.selective_thresholds)}); re-plan"
        )

    def selective(self, min_intensity: float = 0.0) -> UnitProfile:
        """This unit run under op-level selective checkpointing, as the memory model sees a
        plain unit: it keeps its whole input (checkpointing saves it) and the outputs of its
        kept operators (``sel_saved_bytes``, ``sel_saves_output_bytes`` of its output; with
        ``min_intensity``, those of a variant); its backward recomputes the rest
        (``sel_recomputed_bytes``) at their first use: its peak is measured with every
        eligible unit selective (``sel_bwd_peak_bytes``); profiles without it assume
        everything recomputed alive through the backward, or the forward's peak less what the
        cache already holds."""
        v = self.sel_terms(min_intensity)
        bwd = v.bwd_peak_bytes
        if bwd is None:  # not measured (older profiles): everything recomputed alive at once
            bwd = max(
                self.bwd_peak_bytes + v.recomputed_bytes,
                self.fwd_peak_bytes - v.saved_bytes - v.saves_output_bytes,
            )
        return replace(
            self,
            saved_bytes=v.saved_bytes,
            saves_input_bytes=self.input_bytes,
            saves_output_bytes=v.saves_output_bytes,
            bwd_peak_bytes=bwd,
        )


def early_stop_savings(skip: Sequence[float], saves: Sequence[bool], s: int, e: int) -> float:
    """What torch's early stop spares a checkpointed segment of units ``s..e-1``: per unit,
    ``skip`` is the cost of its forward after its last save for backward and ``saves`` whether
    it saves anything. The recomputation ends at the segment's last save, so the last unit's
    ``skip`` is spared; a unit that saves nothing is spared whole and the stop falls in the
    unit before it. Empty ``skip``: nothing is spared (profiles from before this was known)."""
    out = 0
    for j in range(e - 1, s - 1, -1) if skip else ():
        out += skip[j]
        if saves[j]:
            break
    return out


def recompute_terms(
    units: Sequence[UnitProfile], device: str | None = None
) -> tuple[list[float], list[float], list[bool]]:
    """Per unit, what recomputing it inside a checkpointed segment costs, in FLOPs
    (``device`` None) or roofline seconds on ``device``: its forward, the part after its last
    save for backward, and whether it saves anything (see :func:`early_stop_savings`)."""
    if device is None:
        full = [u.flops for u in units]
        skip = [u.stop_skip_flops for u in units]
    else:
        full = [u.fwd_time_s[device] for u in units]
        skip = [u.stop_skip_time_s.get(device, 0.0) for u in units]
    return full, skip, [not u.saves_nothing for u in units]


def segment_recompute(prof: ModelProfile, s: int, e: int, device: str | None = None) -> float:
    """FLOPs (``device`` None) or roofline seconds on ``device`` of recomputing units
    ``s..e-1`` inside one checkpointed segment: their forwards less the early stop's
    savings."""
    full, skip, saves = recompute_terms(prof.units[s:e], device)
    return sum(full) - early_stop_savings(skip, saves, 0, len(full))


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """A training step's profile: ``units`` in order, plus what lies before and after them.

    ``static_bytes``: parameters + buffers + model inputs (live for the whole step).
    ``pre_*``: work before unit 0 (e.g. concatenating crops). ``tail_*``: everything after the
    last unit (pooling, heads, loss): ``tail_saved_bytes`` kept for backward,
    ``tail_saves_input_bytes`` of the last unit's output, forward/backward peaks above start.
    ``step_flops``: forward + backward FLOPs of the step. ``measured_peak_bytes``: the peak
    of the profiled plain step itself (a self-check for the memory model). ``step_time_s``: the
    step's roofline time (seconds) per device of :data:`planner.devices.GPUS`. ``loss_bytes``:
    the loss tensor, alive through backward with its gradient (``torch.autograd.backward``
    holds both until it returns). ``bn_param_numel``: BatchNorm parameters (FP32 in every
    mode; how FSDP places them is :class:`~planner.memory.MemoryConfig`'s ``batchnorm``).
    ``shard_rows``: per unit, then the root (every parameter outside the units), the
    ``(rows, numel)`` of each non-BatchNorm parameter: FSDP2 shards dim 0 with padding, so a
    rank's shard and the all-gather buffers follow from it (:mod:`planner.fsdp2`).
    ``raw_input_bytes``: the example input as the model receives it (FP32 images), before the
    cast to the training dtype that ``input_bytes`` counts. ``pre_held_bytes``: what the code
    before unit 0 allocates and keeps referenced through the forward without saving it for
    backward (transformers' ViT casts its input back to the dtype of a sharded parameter).
    ``input_saved``: whether backward keeps the (cast) input; if not, it is freed with the
    forward's frames.
    """

    model: str
    batch_size: int
    dtype: str
    device: str
    units: tuple[UnitProfile, ...]
    static_bytes: int
    param_bytes: int
    tail_param_bytes: int
    param_numel: int
    tail_param_numel: int
    max_param_numel: int
    buffer_bytes: int
    input_bytes: int
    pre_saved_bytes: int
    pre_peak_bytes: int
    tail_saved_bytes: int
    tail_saves_input_bytes: int
    tail_fwd_peak_bytes: int
    tail_bwd_peak_bytes: int
    step_flops: int
    measured_peak_bytes: int
    profile_time_s: float = 0.0
    source: str = "profile"
    loss_bytes: int = 0
    bn_param_numel: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)
    step_time_s: Mapping[str, float] = field(default_factory=dict)
    shard_rows: tuple[tuple[tuple[int, int], ...], ...] = ()
    raw_input_bytes: int = 0
    pre_held_bytes: int = 0
    input_saved: bool = True

    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self.units]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["units"] = [asdict(u) for u in self.units]
        d["activation_bytes"] = [u.activation_bytes for u in self.units]
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any], origin: str = "profile") -> ModelProfile:
        """Read :meth:`to_json` output, or a minimal ``{"units": [names], "activation_bytes":
        [bytes]}`` (then each unit keeps exactly its bytes, and FLOPs are taken ∝ bytes)."""
        try:
            if data["units"] and isinstance(data["units"][0], str):
                return cls._from_minimal(data["units"], data["activation_bytes"], origin)
            units = tuple(UnitProfile(**u) for u in data["units"])
            rest = {k: v for k, v in data.items() if k not in ("units", "activation_bytes")}
            rows = rest.pop("shard_rows", ())
            rest["shard_rows"] = tuple(tuple((int(r), int(n)) for r, n in g) for g in rows)
            return cls(units=units, **rest)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise FsdpkitError(
                f"{origin}: not a profile ({type(e).__name__}: {e}); expected fsdpkit profile "
                'JSON or {"units": [names], "activation_bytes": [bytes]}'
            ) from None

    @classmethod
    def _from_minimal(cls, names: Sequence[str], act: Sequence[int], origin: str) -> ModelProfile:
        if len(names) != len(act) or not names:
            raise ValueError(f"{len(names)} units but {len(act)} activation_bytes")
        if any(not isinstance(a, int) or a < 0 for a in act):
            raise ValueError("activation_bytes must be non-negative integers")
        units = tuple(
            UnitProfile(str(n), int(a), 0, 0, 0, 0, int(a), 0, 0, int(a), 0)
            for n, a in zip(names, act, strict=True)
        )
        return cls(
            model=Path(origin).stem, batch_size=0, dtype="unknown", device="none", units=units,
            static_bytes=0, param_bytes=0, tail_param_bytes=0, param_numel=0,
            tail_param_numel=0, max_param_numel=0, buffer_bytes=0, input_bytes=0, pre_saved_bytes=0,
            pre_peak_bytes=0, tail_saved_bytes=0, tail_saves_input_bytes=0,
            tail_fwd_peak_bytes=0, tail_bwd_peak_bytes=0, step_flops=3 * sum(act),
            measured_peak_bytes=0, source="minimal",
        )  # fmt: skip

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> ModelProfile:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise FsdpkitError(f"{path}: cannot read profile: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise FsdpkitError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(data, dict):
            raise FsdpkitError(f"{path}: expected a JSON object")
        return cls.from_json(data, str(path))


def profile_model(
    spec: ModelSpec,
    batch_size: int,
    *,
    device: str | torch.device = "meta",
    dtype: str = "fp32",
    selective: bool = True,
) -> ModelProfile:
    """Profile one training step of ``spec`` at per-device ``batch_size``.

    ``device="meta"`` is symbolic (no allocation); ``"cpu"`` or ``"cuda"`` run real tensors
    through the same tracker. ``dtype`` is the training precision (``fp32``, ``fp16``,
    ``bf16``), emulated as FSDP mixed precision runs it (BatchNorm in FP32). With
    ``selective=False`` the passes that measure units under op-level selective checkpointing
    are skipped (1 + ``SEL_VARIANTS`` of the 2 + 1 + ``SEL_VARIANTS`` passes): enough for
    whole-unit plans, and no unit is offered selective checkpointing.
    """
    if batch_size < 1:
        raise FsdpkitError(f"batch size must be >= 1, got {batch_size}")
    if dtype not in DTYPES:
        raise FsdpkitError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    t0 = time.perf_counter()
    device = torch.device(device)
    model = emulate_mixed_precision(spec.build_model(device).train(), DTYPES[dtype])
    units = spec.named_units(model)
    raw = spec.example_input(batch_size, device)
    raw_input_bytes = sum(t.nbytes for t in tree_leaves(raw) if isinstance(t, torch.Tensor))
    inputs = cast_inputs(raw, DTYPES[dtype])
    del raw
    static = [*model.parameters(), *model.buffers(), *tree_leaves(inputs)]
    excluded = {storage_key(s) for s in tensor_storages(static)}
    tracker = LiveMemory()
    tracker.register(static)
    static_bytes = tracker.live

    plain = Trace(tracker, len(units), excluded)
    plain.input_keys = {storage_key(s) for s in tensor_storages(tree_leaves(inputs))}
    costs = OpCosts(len(units), dtype, plain.forward_unit, excluded)
    tracker.on_op = costs
    plain.on_forward_done = costs.finish_forward
    plain.on_pack = costs.pack
    nograd = Trace(LiveMemory(), len(units), excluded)
    nograd.t.register(static)
    low = DTYPES[dtype]
    views = (
        sharded_param_views([u for _, u in units], low, _BN)
        if low != torch.float32
        else contextlib.nullcontext()
    )
    with fused_attention_on_meta() if device.type == "meta" else contextlib.nullcontext():
        with views:
            step_flops = plain.run(spec, model, units, inputs, grad=True)
            tracker.on_op = None
            nograd.run(spec, model, units, inputs, grad=False)
        model.zero_grad(set_to_none=True)
        # without the views: recomputation runs in backward, where FSDP2 has the unit's
        # parameters in the training dtype (the views swap them back after each forward)
        eligible = [i for i in range(len(units)) if selective and not costs.unsafe(i)]
        thresholds = {
            i: variant_thresholds(costs, i, plain.saved[i], plain.inputs[i], plain.outputs[i])
            for i in eligible
        }
        # one pass per variant level, every unit that has that level at once
        sel_bwd = [
            selective_bwd_peaks(spec, model, inputs, static, excluded,
                                 {i: ([0.0, *t])[k] for i, t in thresholds.items()
                                  if k <= len(t)})
            for k in range(1 + SEL_VARIANTS if eligible else 0)
        ]  # fmt: skip

    in_units = {id(p) for _, u in units for p in u.parameters()}
    params = list(model.parameters())
    profiles = []
    for i, (name, unit) in enumerate(units):
        saved, ins, outs = plain.saved[i], plain.inputs[i], plain.outputs[i]
        boundary = ins.keys() | outs.keys()
        profiles.append(
            UnitProfile(
                name=name,
                saved_bytes=sum(v for k, v in saved.items() if k not in boundary),
                input_bytes=total_bytes(ins),
                output_bytes=total_bytes(outs),
                saves_input_bytes=total_bytes(saved, ins.keys()),
                saves_output_bytes=total_bytes(saved, outs.keys() - ins.keys()),
                fwd_peak_bytes=plain.fwd_peak[i],
                fwd_nograd_peak_bytes=nograd.fwd_peak[i],
                bwd_peak_bytes=plain.bwd_peak[i],
                later_output_bytes=plain.later_outputs[i],
                flops=plain.flops[i],
                param_bytes=sum(p.nbytes for p in unit.parameters()),
                param_numel=sum(p.numel() for p in unit.parameters()),
                input_held_until=nograd.held_until[i],
                between_held_bytes=plain.between_held[i],
                between_held_until=plain.between_until[i],
                fwd_time_s=costs.fwd_time[i],
                stop_skip_flops=costs.after_flops[i],
                stop_skip_time_s=costs.after_time[i],
                saves_nothing=costs.packs[i] == 0,
                **selective_fields(saved, ins, outs, costs, i, thresholds.get(i), sel_bwd),
            )
        )
    last_out = plain.outputs[-1].keys()
    prof = ModelProfile(
        model=spec.name,
        batch_size=batch_size,
        dtype=dtype,
        device=str(device),
        units=tuple(profiles),
        static_bytes=static_bytes,
        param_bytes=sum(p.nbytes for p in params),
        tail_param_bytes=sum(p.nbytes for p in params if id(p) not in in_units),
        param_numel=sum(p.numel() for p in params),
        tail_param_numel=sum(p.numel() for p in params if id(p) not in in_units),
        max_param_numel=max((p.numel() for p in params), default=0),
        buffer_bytes=sum(b.nbytes for b in model.buffers()),
        input_bytes=sum(t.nbytes for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)),
        pre_saved_bytes=total_bytes(plain.saved["pre"]),
        pre_peak_bytes=plain.pre_peak,
        tail_saved_bytes=sum(v for k, v in plain.saved["tail"].items() if k not in last_out),
        tail_saves_input_bytes=total_bytes(plain.saved["tail"], last_out),
        tail_fwd_peak_bytes=plain.tail_fwd_peak,
        tail_bwd_peak_bytes=plain.tail_bwd_peak,
        step_flops=step_flops,
        measured_peak_bytes=tracker.peak,
        profile_time_s=time.perf_counter() - t0,
        loss_bytes=plain.loss_bytes,
        bn_param_numel=sum(
            p.numel() for m in model.modules() if isinstance(m, _BN) for p in m.parameters()
        ),
        step_time_s=costs.step_time,
        shard_rows=shard_rows(model, [u for _, u in units]),
        raw_input_bytes=raw_input_bytes,
        pre_held_bytes=plain.pre_held,
        input_saved=plain.input_saved,
    )
    return prof
