"""SEER presets (SPEC §2 table) and small test presets, exposed as :class:`fsdpkit.ModelSpec`.

Each preset is registered in the ``fsdpkit.models`` entry-point group (see ``setup.cfg``) by a
zero-argument function of the same name below.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from fsdpkit import ModelSpec

from .generate import RegNetConfig
from .regnet import RegNetTrunk, init_weights
from .swav import SwAVHead, SwAVModel

__all__ = ["PRESETS", "SEERPreset", "build_swav_model", "multicrop_input", "preset_spec"]

SEER_CROPS = (160, 160, 96, 96, 96, 96)  # 2 × 160 px + 4 × 96 px (SPEC §3)


@dataclass(frozen=True, slots=True, kw_only=True)
class SEERPreset:
    """A RegNetY trunk + SwAV head + prototypes, and the crop sizes of one training sample.

    ``head_hidden``: hidden and output widths after the trunk (the trunk width is prepended).
    ``crop_sizes``: side in pixels of every crop of one image, in order.
    """

    name: str
    regnet: RegNetConfig
    head_hidden: tuple[int, ...] = (8192, 8192, 256)
    num_prototypes: int = 16000
    crop_sizes: tuple[int, ...] = SEER_CROPS
    source: str = ""

    @property
    def head_dims(self) -> tuple[int, ...]:
        return (self.regnet.out_width, *self.head_hidden)


def _rg(d: int, w_0: int, w_a: float, w_m: float, gw: int) -> RegNetConfig:
    return RegNetConfig(depth=d, w_0=w_0, w_a=w_a, w_m=w_m, group_width=gw)


PRESETS: dict[str, SEERPreset] = {
    p.name: p
    for p in [
        SEERPreset(
            name="regnet10b",
            regnet=_rg(27, 1744, 620.83, 2.52, 1010),
            source="VISSL pretrain/seer/models/regnet10B.yaml",
        ),
        SEERPreset(
            name="rg256gf",
            regnet=_rg(27, 640, 230.83, 2.53, 373),
            source="VISSL regnet256Gf_1.yaml",
        ),
        SEERPreset(
            name="rg128gf",
            regnet=_rg(27, 456, 160.83, 2.52, 264),
            source="ClassyVision regnet_y_128gf",
        ),
        SEERPreset(
            name="rg64gf",
            regnet=_rg(20, 352, 147.48, 2.40, 328),
            source="ClassyVision regnet_y_64gf",
        ),
        SEERPreset(
            name="rg32gf",
            regnet=_rg(20, 232, 115.89, 2.53, 232),
            head_hidden=(4096, 4096, 256),
            source="ClassyVision regnet_y_32gf",
        ),
        SEERPreset(
            name="rg16gf",
            regnet=_rg(18, 200, 106.23, 2.48, 112),
            head_hidden=(4096, 4096, 256),
            source="ClassyVision regnet_y_16gf",
        ),
        SEERPreset(
            name="rg8gf",
            regnet=_rg(17, 192, 76.82, 2.19, 56),
            head_hidden=(4096, 4096, 256),
            source="ClassyVision regnet_y_8gf",
        ),
        # Test preset: 5 blocks in 3 stages (24, 48, 96 channels); trains in seconds on a CPU.
        SEERPreset(
            name="tiny",
            regnet=_rg(5, 24, 24.0, 2.0, 8),
            head_hidden=(128, 128, 32),
            num_prototypes=64,
            crop_sizes=(64, 64, 32, 32, 32, 32),
            source="fsdpkit test preset",
        ),
    ]
}


def build_swav_model(preset: SEERPreset, device: torch.device | str = "cpu") -> SwAVModel:
    """Build and initialise ``preset`` on ``device``.

    Modules are created on ``meta`` and materialised with ``to_empty`` + :func:`init_weights`,
    so every weight is written once; on ``meta`` nothing is allocated at all.
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = SwAVModel(
            RegNetTrunk(preset.regnet), SwAVHead(preset.head_dims), preset.num_prototypes
        )
    if device.type != "meta":
        model.to_empty(device=device)
        init_weights(model)
    return model


def multicrop_input(
    crop_sizes: tuple[int, ...], batch_size: int, device: torch.device
) -> list[torch.Tensor]:
    """One standard-normal (B, 3, s, s) batch per crop size: the per-GPU training input."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return [torch.randn(batch_size, 3, s, s, device=device) for s in crop_sizes]


def _trunk_units(model: nn.Module) -> list[nn.Module]:
    return list(model.trunk.units)


def _info(preset: SEERPreset) -> dict:
    stages = preset.regnet.stages()
    trunk_flops = sum(c.flops for c in preset.regnet.unit_costs(224))
    sizes = preset.crop_sizes
    crops = "+".join(f"{sizes.count(s)}×{s}" for s in dict.fromkeys(sizes))
    return {
        "stage_widths": [s.width for s in stages],
        "stage_depths": [s.depth for s in stages],
        "group_widths": [s.group_width for s in stages],
        "groups": [s.groups for s in stages],
        "trunk_gflops_224px": round(trunk_flops / 1e9, 2),
        "crops": crops,
        "head_dims": list(preset.head_dims),
        "prototypes": preset.num_prototypes,
        "source": preset.source,
    }


def preset_spec(name: str) -> ModelSpec:
    """The :class:`fsdpkit.ModelSpec` of preset ``name`` (a key of :data:`PRESETS`)."""
    preset = PRESETS[name]
    return ModelSpec(
        name=name,
        build=partial(build_swav_model, preset),
        example_input=partial(multicrop_input, preset.crop_sizes),
        units=_trunk_units,
        description=f"RegNetY {name} + SwAV head ({preset.source})",
        info=_info(preset),
    )


# Entry points (one per preset; see setup.cfg).
def regnet10b() -> ModelSpec:
    return preset_spec("regnet10b")


def rg256gf() -> ModelSpec:
    return preset_spec("rg256gf")


def rg128gf() -> ModelSpec:
    return preset_spec("rg128gf")


def rg64gf() -> ModelSpec:
    return preset_spec("rg64gf")


def rg32gf() -> ModelSpec:
    return preset_spec("rg32gf")


def rg16gf() -> ModelSpec:
    return preset_spec("rg16gf")


def rg8gf() -> ModelSpec:
    return preset_spec("rg8gf")


def tiny() -> ModelSpec:
    return preset_spec("tiny")
