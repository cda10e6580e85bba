"""RegNetY generation and analytic costs, as pure functions of a few numbers (pycls / SPEC §2).

Nothing here touches torch: widths, depths, groups, parameter counts and FLOPs are derived from
``(d, w_0, w_a, w_m, group_width)`` alone, so a 10B-parameter model can be described, tabled and
planned without building it.

FLOPs follow ``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per multiply-accumulate of a
convolution or matrix multiply, nothing for element-wise ops, pooling or normalisation. pycls'
preset names count multiply-accumulates, so ``rg8gf`` shows about 16 GFLOPs at 224 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "BlockSpec",
    "RegNetConfig",
    "StageSpec",
    "UnitCost",
    "adjust_widths_groups",
    "block_cost",
    "conv_out",
    "generate_regnet",
    "quantize_widths",
    "stem_cost",
]


def quantize_widths(w_a: float, w_0: int, w_m: float, d: int, q: int = 8) -> list[int]:
    """Per-block widths (length ``d``) of the linear-then-quantised RegNet parameterisation.

    ``ws_cont = w_0 + w_a * i``; each is snapped to ``w_0 * w_m**k`` (k rounded in log space)
    and then to a multiple of ``q``. Rounding is half-to-even, as numpy's in pycls.
    """
    widths = []
    for i in range(d):
        w_cont = i * w_a + w_0
        k = round(math.log(w_cont / w_0) / math.log(w_m))
        widths.append(round(w_0 * w_m**k / q) * q)
    return widths


def generate_regnet(
    w_a: float, w_0: int, w_m: float, d: int, q: int = 8
) -> tuple[list[int], list[int]]:
    """Stage widths and depths (ascending widths, depths summing to ``d``)."""
    per_block = quantize_widths(w_a, w_0, w_m, d, q)
    widths = sorted(set(per_block))
    depths = [per_block.count(w) for w in widths]
    return widths, depths


def adjust_widths_groups(widths: list[int], group_width: int) -> tuple[list[int], list[int]]:
    """Make each stage width a multiple of its group width (bottleneck ratio 1.0).

    Returns ``(widths, group_widths)``: ``g = min(group_width, w)``, ``w = round(w / g) * g``.
    """
    gws = [min(group_width, w) for w in widths]
    ws = [max(g, round(w / g) * g) for w, g in zip(widths, gws, strict=True)]
    return ws, gws


def conv_out(size: int, stride: int) -> int:
    """Spatial size after a 3×3/pad-1 or 1×1/pad-0 conv with ``stride`` (both give ceil)."""
    return (size - 1) // stride + 1


@dataclass(frozen=True, slots=True)
class UnitCost:
    """Analytic cost of one unit for one image.

    ``params``: parameter count (BatchNorm running statistics are buffers, not counted).
    ``flops``: forward FLOPs (2 × MACs of convs / linears) for one image of the given size.
    ``out_hw``: output spatial size.
    """

    params: int
    flops: int
    out_hw: tuple[int, int]


def _bn_params(c: int) -> int:
    return 2 * c


def stem_cost(w_out: int, hw: tuple[int, int], w_in: int = 3) -> UnitCost:
    """Stem: 3×3 conv stride 2 (no bias) → BN → ReLU."""
    oh, ow = conv_out(hw[0], 2), conv_out(hw[1], 2)
    macs = oh * ow * w_in * w_out * 9
    return UnitCost(params=9 * w_in * w_out + _bn_params(w_out), flops=2 * macs, out_hw=(oh, ow))


@dataclass(frozen=True, slots=True)
class BlockSpec:
    """One ResBottleneckBlock: widths in channels, ``group_width`` channels per conv group."""

    w_in: int
    w_out: int
    stride: int
    group_width: int
    bottleneck_ratio: float = 1.0
    se_ratio: float = 0.25

    @property
    def w_b(self) -> int:
        return round(self.w_out * self.bottleneck_ratio)

    @property
    def groups(self) -> int:
        return self.w_b // self.group_width

    @property
    def w_se(self) -> int:
        # SE width comes from the block's *input* width (pycls), not its bottleneck width.
        return round(self.se_ratio * self.w_in)

    @property
    def has_proj(self) -> bool:
        return self.w_in != self.w_out or self.stride != 1


def block_cost(spec: BlockSpec, hw: tuple[int, int]) -> UnitCost:
    """ResBottleneckBlock: 1×1 → 3×3 grouped (stride) → SE → 1×1, plus projection shortcut."""
    w_in, w_out, w_b, w_se, g = spec.w_in, spec.w_out, spec.w_b, spec.w_se, spec.group_width
    h, w = hw
    oh, ow = conv_out(h, spec.stride), conv_out(w, spec.stride)
    params = (
        w_in * w_b + _bn_params(w_b)  # a: 1×1
        + 9 * w_b * g + _bn_params(w_b)  # b: 3×3, groups = w_b / g, so g inputs per output
        + (w_b * w_se + w_se) + (w_se * w_b + w_b)  # SE: two 1×1 convs with bias
        + w_b * w_out + _bn_params(w_out)  # c: 1×1
    )  # fmt: skip
    macs = h * w * w_in * w_b + oh * ow * w_b * 9 * g + 2 * w_b * w_se + oh * ow * w_b * w_out
    if spec.has_proj:
        params += w_in * w_out + _bn_params(w_out)
        macs += oh * ow * w_in * w_out
    return UnitCost(params=params, flops=2 * macs, out_hw=(oh, ow))


@dataclass(frozen=True, slots=True)
class StageSpec:
    """One stage: ``depth`` blocks of ``width`` channels; the first block has stride 2."""

    width: int
    depth: int
    group_width: int

    @property
    def groups(self) -> int:
        return self.width // self.group_width


@dataclass(frozen=True, slots=True, kw_only=True)
class RegNetConfig:
    """RegNetY parameterisation (pycls): depth, initial width, slope, multiplier, group width.

    Fixed as in SEER: quantisation 8, bottleneck ratio 1.0, SE ratio 0.25, stem width 32,
    stride 2 at every stage.
    """

    depth: int
    w_0: int
    w_a: float
    w_m: float
    group_width: int
    q: int = 8
    stem_width: int = 32
    se_ratio: float = 0.25

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"RegNet depth must be >= 1, got {self.depth}")
        if self.q < 1 or self.w_0 <= 0 or self.w_0 % self.q:
            raise ValueError(f"w_0 must be a positive multiple of q={self.q}, got {self.w_0}")
        if self.w_a < 0:
            raise ValueError(f"w_a must be >= 0, got {self.w_a}")
        if self.w_m <= 1:
            raise ValueError(f"w_m must be > 1, got {self.w_m}")
        if self.group_width < 1:
            raise ValueError(f"group_width must be >= 1, got {self.group_width}")

    def stages(self) -> list[StageSpec]:
        widths, depths = generate_regnet(self.w_a, self.w_0, self.w_m, self.depth, self.q)
        widths, gws = adjust_widths_groups(widths, self.group_width)
        return [StageSpec(w, d, g) for w, d, g in zip(widths, depths, gws, strict=True)]

    def blocks(self) -> list[tuple[int, int, BlockSpec]]:
        """``(stage, index_in_stage, BlockSpec)`` for every block in order (stages from 1)."""
        out, w_in = [], self.stem_width
        for s, stage in enumerate(self.stages(), start=1):
            for i in range(stage.depth):
                spec = BlockSpec(
                    w_in=w_in,
                    w_out=stage.width,
                    stride=2 if i == 0 else 1,
                    group_width=stage.group_width,
                    se_ratio=self.se_ratio,
                )
                out.append((s, i, spec))
                w_in = stage.width
        return out

    @property
    def out_width(self) -> int:
        return self.stages()[-1].width

    def unit_costs(self, image_size: int) -> list[UnitCost]:
        """Analytic cost of each unit (stem, then blocks) for one square image."""
        hw = (image_size, image_size)
        costs = [stem_cost(self.stem_width, hw)]
        for _, _, spec in self.blocks():
            costs.append(block_cost(spec, costs[-1].out_hw))
        return costs
