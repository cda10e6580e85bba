"""RegNetY trunks, the SwAV head and the SEER presets (registered as fsdpkit models)."""

from .generate import (
    BlockSpec,
    RegNetConfig,
    StageSpec,
    UnitCost,
    adjust_widths_groups,
    block_cost,
    generate_regnet,
    quantize_widths,
    stem_cost,
)
from .presets import PRESETS, SEERPreset, build_swav_model, multicrop_input, preset_spec
from .regnet import (
    MultiResolutionUnit,
    RegNetTrunk,
    ResBottleneckBlock,
    SqueezeExcitation,
    Stem,
    UnitInfo,
    init_weights,
)
from .swav import SwAVHead, SwAVModel, resolution_groups

__all__ = [
    "PRESETS",
    "BlockSpec",
    "MultiResolutionUnit",
    "RegNetConfig",
    "RegNetTrunk",
    "ResBottleneckBlock",
    "SEERPreset",
    "SqueezeExcitation",
    "StageSpec",
    "Stem",
    "SwAVHead",
    "SwAVModel",
    "UnitCost",
    "UnitInfo",
    "adjust_widths_groups",
    "block_cost",
    "build_swav_model",
    "generate_regnet",
    "init_weights",
    "multicrop_input",
    "preset_spec",
    "quantize_widths",
    "resolution_groups",
    "stem_cost",
]
