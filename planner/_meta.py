"""How the symbolic profile runs a model on ``meta`` as real devices would."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["cast_inputs", "fused_attention_on_meta"]


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
