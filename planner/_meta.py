"""How the symbolic profile runs a model on ``meta`` as real devices would."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "cast_inputs",
    "emulate_mixed_precision",
    "fused_attention_on_meta",
    "sharded_param_views",
]


@contextlib.contextmanager
def fused_attention_on_meta():
    """On meta, ``scaled_dot_product_attention`` has no fused kernel to pick and falls back to
    the math path, which saves the (T × T) attention matrix; real devices run a fused
    (flash-style) kernel that saves only the output and the log-sum-exp. Route meta calls to
    the fused CPU kernel, whose saved tensors match what real devices keep."""
    original = F.scaled_dot_product_attention

    def routed(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        # A mask that needs a gradient (Swin's position bias) rules the fused kernel out on
        # real devices too: those calls take the math path there as here.
        mask_grad = isinstance(attn_mask, torch.Tensor) and attn_mask.requires_grad
        if q.is_meta and not kw.get("enable_gqa", False) and not mask_grad:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
            )[0]
        return original(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kw)

    F.scaled_dot_product_attention = routed
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def cast_inputs(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, list | tuple):
        return type(obj)(cast_inputs(o, dtype) for o in obj)
    return obj


class sharded_param_views:
    """Units' parameters as FSDP2 mixed precision shows them to the model's code: outside a
    unit's forward, FP32 (sharded, in FSDP2); inside it, the training dtype, with the unit's
    floating inputs cast to that dtype first (``MixedPrecisionPolicy.cast_forward_inputs``).

    Code that reads a unit's parameter outside the unit (transformers' ``ViTModel`` casts its
    input to ``embeddings...projection.weight.dtype``) then does what it does under FSDP2. The
    FP32 stand-ins are never allocated on the profiled device's tracker: they are created
    before tracking starts and only their dtype is read. Enter this before the profile adds
    its own unit hooks: forward pre-hooks run in registration order, so the profile sees what
    FSDP2's (prepended) hook hands a unit, the cast input."""

    def __init__(self, units: list[torch.nn.Module], dtype: torch.dtype, skip: type) -> None:
        self.dtype = dtype
        self.params: list[list[tuple[torch.nn.Module, str, torch.nn.Parameter, torch.Tensor]]] = []
        for unit in units:
            own = []
            for m in unit.modules():
                if isinstance(m, skip):
                    continue
                for name, p in m.named_parameters(recurse=False):
                    if p.dtype == dtype:
                        stand_in = torch.nn.Parameter(
                            torch.empty(p.shape, dtype=torch.float32, device=p.device),
                            p.requires_grad,
                        )
                        own.append((m, name, p, stand_in))
            self.params.append(own)
        self.handles: list[Any] = []
        self.units = units

    def _swap(self, i: int, low: bool) -> None:
        for m, name, p, stand_in in self.params[i]:
            m._parameters[name] = p if low else stand_in

    def __enter__(self) -> sharded_param_views:
        for i, unit in enumerate(self.units):
            self._swap(i, low=False)

            def pre(_m, args, kwargs, i=i):
                self._swap(i, low=True)
                return cast_inputs(args, self.dtype), {
                    k: cast_inputs(v, self.dtype) for k, v in kwargs.items()
                }

            def post(_m, _args, out, i=i):
                self._swap(i, low=False)
                return out

            self.handles.append(unit.register_forward_pre_hook(pre, with_kwargs=True))
            self.handles.append(unit.register_forward_hook(post))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for i in range(len(self.units)):
            self._swap(i, low=True)


def emulate_mixed_precision(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Run ``model`` as FSDP mixed precision does: parameters in ``dtype``, BatchNorm in FP32.

    Non-BN parameters are cast to ``dtype``; each BatchNorm keeps FP32 parameters and running
    statistics and takes its input in ``dtype``, as :mod:`fsdpkit.syncbn` does: FP32
    arithmetic, output in ``dtype``, and only the low-precision input (plus per-channel FP32
    vectors) kept for backward.
    """
    if dtype == torch.float32:
        return model
    for m in model.modules():
        if not isinstance(m, _BatchNorm):
            for name, p in list(m.named_parameters(recurse=False)):
                setattr(m, name, nn.Parameter(p.detach().to(dtype), p.requires_grad))
    return model
