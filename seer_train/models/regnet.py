"""RegNetY trunk as an ordered list of units (stem, then every block), pycls structure.

The trunk keeps its units in one ``nn.ModuleList`` so that planners, FSDP wrapping and
checkpoint slicing can address them by index; per-unit stage metadata (:class:`UnitInfo`) sits
alongside. Every unit reports its analytic cost through ``unit.cost(hw)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .generate import BlockSpec, RegNetConfig, UnitCost, block_cost, stem_cost

__all__ = [
    "MultiResolutionUnit",
    "RegNetTrunk",
    "ResBottleneckBlock",
    "SqueezeExcitation",
    "Stem",
    "UnitInfo",
    "init_weights",
]

BN_EPS = 1e-5
BN_MOMENTUM = 0.1


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MultiResolutionUnit(nn.Module):
    """A unit called once with a tensor, or with a list of tensors (one per resolution group).

    One call per unit for all multi-crop resolutions means one FSDP all-gather per unit, and
    BatchNorm statistics per group as in the SwAV reference (each group is normalised alone).
    """

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]):
        if isinstance(x, torch.Tensor):
            return self.forward_one(x)
        return [self.forward_one(t) for t in x]

    def forward_one(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Stem(MultiResolutionUnit):
    """3×3 conv stride 2 (no bias) → BN → ReLU: (N, 3, H, W) → (N, w_out, ⌈H/2⌉, ⌈W/2⌉)."""

    def __init__(self, w_out: int, w_in: int = 3) -> None:
        super().__init__()
        self.w_in, self.w_out = w_in, w_out
        self.conv = nn.Conv2d(w_in, w_out, 3, stride=2, padding=1, bias=False)
        self.bn = _bn(w_out)
        self.relu = nn.ReLU(inplace=True)

    def forward_one(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))

    def cost(self, hw: tuple[int, int]) -> UnitCost:
        return stem_cost(self.w_out, hw, self.w_in)


class SqueezeExcitation(nn.Module):
    """Squeeze-excitation: avg pool → 1×1 (w → w_se) → ReLU → 1×1 (w_se → w) → sigmoid → scale."""

    def __init__(self, w: int, w_se: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(w, w_se, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(w_se, w, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.avg_pool(x)  # (N, w, 1, 1)
        s = self.expand(self.relu(self.reduce(s))).sigmoid()
        return x * s


class ResBottleneckBlock(MultiResolutionUnit):
    """Residual bottleneck block with group conv and SE: ``ReLU(shortcut(x) + f(x))``.

    (N, w_in, H, W) → (N, w_out, ceil(H/stride), ceil(W/stride)). The shortcut is a 1×1 conv
    (stride) → BN when the width or resolution changes, else identity.
    """

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.spec = spec
        w_b = spec.w_b
        if spec.has_proj:
            self.proj = nn.Conv2d(spec.w_in, spec.w_out, 1, stride=spec.stride, bias=False)
            self.proj_bn = _bn(spec.w_out)
        self.a = nn.Conv2d(spec.w_in, w_b, 1, bias=False)
        self.a_bn = _bn(w_b)
        self.b = nn.Conv2d(
            w_b, w_b, 3, stride=spec.stride, padding=1, groups=spec.groups, bias=False
        )
        self.b_bn = _bn(w_b)
        self.se = SqueezeExcitation(w_b, spec.w_se)
        self.c = nn.Conv2d(w_b, spec.w_out, 1, bias=False)
        self.c_bn = _bn(spec.w_out)
        self.relu = nn.ReLU(inplace=True)

    def forward_one(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.proj_bn(self.proj(x)) if self.spec.has_proj else x
        f = self.relu(self.a_bn(self.a(x)))
        f = self.relu(self.b_bn(self.b(f)))
        f = self.c_bn(self.c(self.se(f)))
        return self.relu(shortcut + f)

    def cost(self, hw: tuple[int, int]) -> UnitCost:
        return block_cost(self.spec, hw)


@dataclass(frozen=True, slots=True)
class UnitInfo:
    """Where a unit sits: ``stage`` 0 is the stem; blocks count stages from 1."""

    index: int
    kind: str  # "stem" | "block"
    stage: int
    index_in_stage: int
    w_in: int
    w_out: int
    stride: int
    group_width: int | None


class RegNetTrunk(nn.Module):
    """RegNetY trunk: ``units`` = [stem, block, block, ...], then global average pool + flatten.

    (N, 3, H, W) → (N, out_width); a list of groups (N_g, 3, H_g, W_g) → (sum N_g, out_width),
    every unit called once for all groups. ``unit_info[i]`` describes ``units[i]``.
    """

    def __init__(self, config: RegNetConfig) -> None:
        super().__init__()
        self.config = config
        units: list[nn.Module] = [Stem(config.stem_width)]
        info = [UnitInfo(0, "stem", 0, 0, 3, config.stem_width, 2, None)]
        for stage, i, spec in config.blocks():
            units.append(ResBottleneckBlock(spec))
            info.append(
                UnitInfo(len(info), "block", stage, i, spec.w_in, spec.w_out, spec.stride,
                         spec.group_width)
            )  # fmt: skip
        self.units = nn.ModuleList(units)
        self.unit_info: tuple[UnitInfo, ...] = tuple(info)
        self.out_width = config.out_width
        self.avg_pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        if isinstance(x, torch.Tensor):
            return self.avg_pool(x).flatten(1)  # (N, out_width)
        return torch.cat([self.avg_pool(t).flatten(1) for t in x])  # (sum N_g, out_width)

    def unit_costs(self, hw: tuple[int, int]) -> list[UnitCost]:
        """Analytic cost of every unit for one image of spatial size ``hw``."""
        costs = []
        for unit in self.units:
            costs.append(unit.cost(hw))
            hw = costs[-1].out_hw
        return costs


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """pycls init for the trunk, PyTorch's default for the SwAV head; also resets BatchNorm
    running statistics. Safe after ``to_empty`` (it writes every parameter and buffer).

    Conv: N(0, sqrt(2 / (k·k·out_channels))), conv bias 0; BN: weight 1, bias 0. Linear (the
    SwAV head and prototypes, built from plain ``nn.Linear`` in VISSL): U(±1/sqrt(fan_in)) for
    weight and bias. pycls's N(0, 0.01) for classifier layers would shrink the head's output
    ~10× per layer; with LARC, whose zero-norm biases step at the full LR, the biases then
    dominate the embedding and SwAV collapses within a few steps (measured on ``tiny``).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, _BatchNorm):  # also fsdpkit.SyncBatchNorm, swapped in before init
            m.reset_running_stats()
            m.weight.fill_(1.0)
            m.bias.zero_()
        elif isinstance(m, nn.Linear):
            m.reset_parameters()
