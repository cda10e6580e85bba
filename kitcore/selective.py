"""Which operators op-level selective checkpointing keeps: one list for the planner and the wrapper.

Under selective checkpointing a unit keeps the outputs of its compute-bound operators
(convolutions, matrix products, fused attention) for backward and recomputes everything else
(normalisation, activations, gating, residual adds, reshapes) from those outputs and its input
in backward. The kept operators hold most of the unit's FLOPs; the recomputed ones hold most
of the bytes saved for backward in a convolutional block and cost little arithmetic (though
memory bandwidth: the planner prices them with a roofline, not FLOPs).

:func:`kept_ops` is what :mod:`planner` profiles as "kept" and what :func:`fsdpkit.apply_ac`
tells ``torch.utils.checkpoint``'s selective-checkpoint API to save, so the two cannot disagree.

A unit may also keep by a threshold instead (:func:`keeps`): any operator whose output costs
at least that much time to recompute per byte kept. The score (:func:`op_score`) is the
operator's roofline time per output byte on a reference device, in FLOPs per byte:
``max(FLOPs / out, ridge * bytes moved / out)``, ``ridge`` being the device's peak FLOP/s over
its bandwidth (:data:`REFERENCE_RIDGE`). For a compute-bound operator that is its arithmetic
intensity; for a bandwidth-bound one it is the ridge times the bytes it reads and writes per
byte it writes. A 1x1 convolution that widens its input 4x scores about 1.3 ridges: cheaper
per byte to recompute than a residual add (3 ridges) or a ReLU (2), so at a threshold between
them a unit keeps the add's output and recomputes the convolution's. Keeping by score is the
greedy (exact for the fractional problem) answer to "least recompute time for these bytes",
per operator and independent of order, so it holds under FSDP2 and across releases.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

__all__ = [
    "IDEMPOTENT_INPLACE",
    "KEPT_OP_NAMES",
    "NORM_OP_NAMES",
    "REFERENCE_RIDGE",
    "is_candidate",
    "is_kept_op",
    "keeps",
    "kept_ops",
    "mutates_first",
    "op_intensity",
    "op_score",
    "roofline_score",
]

# aten operator packets whose outputs selective checkpointing saves. Names missing from a
# torch release are skipped (the attention kernels differ between releases and devices).
KEPT_OP_NAMES = (
    "convolution",
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)

# Operators besides pointwise and reduction ones whose outputs a threshold may keep: the
# normalisations and softmaxes, bandwidth-bound and often the largest saves of a unit.
NORM_OP_NAMES = (
    "native_batch_norm",
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training",
    "native_layer_norm",
    "native_group_norm",
    "_softmax",
    "_log_softmax",
)

# Peak FLOP/s over memory bandwidth (FLOPs per byte) of the reference device, H100 SXM
# (``planner.devices``' default): dense tensor-core FP16/BF16, FP32 without TF32, and FP64 at
# half the FP32 rate (34 TFLOP/s on the part), so a float64 call scores exactly half its
# float32 twin, as its FLOPs per byte are half. It only orders operators; the planner prices
# every threshold's choice on the plan's own device.
REFERENCE_RIDGE = {
    torch.float16: 989e12 / 3_350e9,
    torch.bfloat16: 989e12 / 3_350e9,
    torch.float32: 67e12 / 3_350e9,
    torch.float64: 67e12 / 2 / 3_350e9,
}

# In-place operators that give the same result applied twice. A unit's code may apply them to
# a kept output (``relu(inplace=True)`` after a convolution, as squeeze-excitation blocks do):
# the cache then holds the mutated tensor, and recomputation applies the operator again to it,
# which changes nothing. Any other in-place operator on a kept output would be applied twice;
# the planner does not offer selective checkpointing to a unit whose code does that.
IDEMPOTENT_INPLACE = frozenset({"relu_", "hardtanh_", "clamp_", "clamp_min_", "clamp_max_"})


def mutates_first(func: torch._ops.OpOverload) -> bool:
    """Whether ``func`` writes its first argument in place."""
    args = func._schema.arguments
    return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write


@functools.cache
def kept_ops() -> tuple[torch._ops.OpOverload, ...]:
    """Every overload of the kept operators that this torch has (the form
    ``torch.utils.checkpoint.create_selective_checkpoint_contexts`` takes)."""
    out = []
    for name in KEPT_OP_NAMES:
        packet = getattr(torch.ops.aten, name, None)
        if packet is None:
            continue
        out += [getattr(packet, overload) for overload in packet.overloads()]
    return tuple(out)


@functools.cache
def _kept_packets() -> frozenset:
    return frozenset(op.overloadpacket for op in kept_ops())


def is_kept_op(func: torch._ops.OpOverload) -> bool:
    """Whether selective checkpointing keeps ``func``'s output (a dispatch-level operator)."""
    return getattr(func, "overloadpacket", None) in _kept_packets()


@functools.cache
def _norm_packets() -> frozenset:
    aten = torch.ops.aten
    return frozenset(getattr(aten, n) for n in NORM_OP_NAMES if hasattr(aten, n))


@functools.cache
def is_candidate(func: torch._ops.OpOverload) -> bool:
    """Whether a threshold may keep ``func``'s output: a kept, pointwise, reduction or
    normalisation operator that makes a new tensor (no views, nothing written in place, so
    no cast or copy FSDP2 runs around a unit)."""
    if is_kept_op(func):
        return True
    # Writing a buffer on the side (BatchNorm's running statistics) is fine: a cached call is
    # not run again. Writing its input or an out= tensor is not.
    out_arg = any(getattr(a, "is_out", False) for a in func._schema.arguments)
    if func.is_view or mutates_first(func) or out_arg:
        return False
    tags = set(func.tags)
    if getattr(torch.Tag, "nondeterministic_seeded", None) in tags:
        return False
    if torch.Tag.pointwise in tags or getattr(torch.Tag, "reduction", None) in tags:
        return True
    return getattr(func, "overloadpacket", None) in _norm_packets()


def _op_flops(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> int:
    """FLOPs of one operator call by torch's formulas (``torch.utils.flop_counter``); 0 for
    operators without one."""
    count = flop_registry.get(getattr(func, "_overloadpacket", None))
    return count(*args, **(kwargs or {}), out_val=out) if count is not None else 0


def op_intensity(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> float:
    """FLOPs per byte of output of one operator call (torch's FLOP formulas,
    ``torch.utils.flop_counter``); 0 for operators without a formula or outputs."""
    out_bytes = sum(t.nbytes for t in tree_leaves(out) if isinstance(t, torch.Tensor))
    return _op_flops(func, args, kwargs, out) / out_bytes if out_bytes else 0.0


def roofline_score(flops: float, moved: int, out_bytes: int, dtype: torch.dtype) -> float:
    """:func:`op_score` from a call's FLOPs, bytes moved and output bytes (what a profiler
    that already counted them has), its output in ``dtype``."""
    if out_bytes == 0:
        return 0.0
    ridge = REFERENCE_RIDGE.get(dtype, REFERENCE_RIDGE[torch.float32])
    return max(flops / out_bytes, ridge * moved / out_bytes)


def op_score(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> float:
    """Roofline recompute time per byte of output on the reference device, in FLOPs per byte
    (see the module docstring): ``max(intensity, ridge * bytes moved / bytes out)``; bytes
    moved are the tensor arguments' and outputs' bytes. 0 for operators without outputs."""
    outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not outs:
        return 0.0
    out_bytes = sum(t.nbytes for t in outs)
    moved = out_bytes + sum(
        t.nbytes for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
    )
    flops = _op_flops(func, args, kwargs, out) if out_bytes else 0
    return roofline_score(flops, moved, out_bytes, outs[0].dtype)


def keeps(
    func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any, min_intensity: float
) -> bool:
    """Whether selective checkpointing with threshold ``min_intensity`` keeps this call's
    output: 0 keeps every kept operator's (:func:`is_kept_op`) and nothing else; above 0,
    every candidate's (:func:`is_candidate`) whose :func:`op_score` (FLOPs per byte) reaches
    it."""
    if min_intensity <= 0:
        return is_kept_op(func)
    # With grad off, the call runs inside an autograd.Function's forward (a fused or composed
    # normalisation, SyncBN across ranks): its internals differ between the profiled step and
    # the trained one (one rank or many, CPU or CUDA kernels), so a rule never keeps them.
    if not torch.is_grad_enabled():
        return False
    return is_candidate(func) and op_score(func, args, kwargs, out) >= min_intensity
