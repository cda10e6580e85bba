"""Which operators op-level selective checkpointing keeps: one list for the planner and the wrapper.

Under selective checkpointing a unit keeps the outputs of its compute-bound operators
(convolutions, matrix products, fused attention) for backward and recomputes everything else
(normalisation, activations, gating, residual adds, reshapes) from those outputs and its input
in backward. The kept operators hold most of the unit's FLOPs; the recomputed ones hold most
of the bytes saved for backward in a convolutional block and cost little arithmetic (though
memory bandwidth: the planner prices them with a roofline, not FLOPs).

:func:`kept_ops` is what :mod:`planner` profiles as "kept" and what :func:`fsdpkit.apply_ac`
tells ``torch.utils.checkpoint``'s selective-checkpoint API to save, so the two cannot disagree.

A unit may also keep fewer: only the kept operators whose arithmetic intensity (FLOPs per byte
of output, :func:`op_intensity`) is at least a threshold (:func:`keeps`). A 1x1 convolution
that widens its input 4x writes many bytes for few FLOPs per byte; recomputing it frees those
bytes for less time than recomputing a whole unit, while a 3x3 convolution stays kept.
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
    "is_kept_op",
    "keeps",
    "kept_ops",
    "mutates_first",
    "op_intensity",
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


def op_intensity(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> float:
    """FLOPs per byte of output of one operator call (torch's FLOP formulas,
    ``torch.utils.flop_counter``); 0 for operators without a formula or outputs."""
    count = flop_registry.get(getattr(func, "_overloadpacket", None))
    out_bytes = sum(t.nbytes for t in tree_leaves(out) if isinstance(t, torch.Tensor))
    if count is None or out_bytes == 0:
        return 0.0
    return count(*args, **(kwargs or {}), out_val=out) / out_bytes


def keeps(
    func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any, min_intensity: float
) -> bool:
    """Whether selective checkpointing with threshold ``min_intensity`` (FLOPs per byte of
    output; 0 keeps every kept operator) keeps this call's output."""
    if not is_kept_op(func):
        return False
    return min_intensity <= 0 or op_intensity(func, args, kwargs, out) >= min_intensity
