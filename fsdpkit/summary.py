"""Model summaries computed on the meta device: parameters by part and FLOPs per sample.

Works for any :class:`~fsdpkit.ModelSpec`: the model is built on ``meta`` (no memory), its
parameters are counted per top-level child, and one training sample's forward is counted with
``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-accumulate of convs and
matmuls).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from kitcore.registry import ModelSpec

__all__ = ["ModelSummary", "count_forward_flops", "summarize_model"]


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """``parameters``: counts per top-level child (``"(root)"`` for the model's own) and
    ``"total"``; ``flops_per_sample``: forward FLOPs of ``example_input(1)``."""

    name: str
    description: str
    num_units: int
    parameters: Mapping[str, int]
    flops_per_sample: int
    info: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "units": self.num_units,
            "parameters": dict(self.parameters),
            "flops_per_sample": self.flops_per_sample,
            "info": dict(self.info),
        }


def count_forward_flops(model: torch.nn.Module, inputs: Any) -> int:
    """Forward FLOPs of ``model(inputs)`` (shapes only; runs on meta tensors)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(inputs)
    return int(counter.get_total_flops())


def summarize_model(spec: ModelSpec) -> ModelSummary:
    """Build ``spec`` on meta and count its parameters and per-sample forward FLOPs."""
    model = spec.build_model("meta")
    units = spec.named_units(model)
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():
        part = name.split(".", 1)[0] if "." in name else "(root)"
        parts[part] = parts.get(part, 0) + p.numel()
    parts["total"] = sum(parts.values())
    flops = count_forward_flops(model, spec.example_input(1, torch.device("meta")))
    return ModelSummary(
        name=spec.name,
        description=spec.description,
        num_units=len(units),
        parameters=parts,
        flops_per_sample=flops,
        info=spec.info,
    )
