"""Model code no one here wrote, as fsdpkit ModelSpecs: Hugging Face ``transformers`` vision
models built from small configs with random weights (nothing downloaded).

Each spec's units are the model's repeated blocks in execution order plus the stem
(embeddings); the loss is the mean of the logits. ``regnet_y_400mf`` has RegNetY-400MF's
stage widths, depths and group width (the model of issue 15) at a small image size.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from fsdpkit import ModelSpec


def _logits_loss(out) -> torch.Tensor:
    return out.logits.float().mean()


def _images(size: int, batch_size: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch_size, 3, size, size, device=device)  # (N, 3, H, W)


def _build(make: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    with torch.device(device):
        return make()


def _regnet_units(m: nn.Module) -> list[nn.Module]:
    return [m.regnet.embedder, *(b for st in m.regnet.encoder.stages for b in st.layers)]


def _resnet_units(m: nn.Module) -> list[nn.Module]:
    return [m.resnet.embedder, *(b for st in m.resnet.encoder.stages for b in st.layers)]


def _convnext_units(m: nn.Module) -> list[nn.Module]:
    units: list[nn.Module] = [m.convnext.embeddings]
    for st in m.convnext.encoder.stages:
        units += [*st.downsampling_layer, *st.layers]
    return units


def _vit_units(m: nn.Module) -> list[nn.Module]:
    enc = getattr(m.vit, "encoder", m.vit)  # transformers 5 keeps the layers on the model
    return [m.vit.embeddings, *getattr(enc, "layer", getattr(enc, "layers", []))]


def _swin_units(m: nn.Module) -> list[nn.Module]:
    units: list[nn.Module] = [m.swin.embeddings]
    for st in m.swin.encoder.layers:
        units += [*st.blocks, *([st.downsample] if st.downsample is not None else [])]
    return units


def _spec(name: str, make, units, size: int) -> ModelSpec:
    return ModelSpec(
        name=name,
        build=partial(_build, make),
        example_input=partial(_images, size),
        units=units,
        loss=_logits_loss,
        description=f"transformers {name}, random weights",
    )


def _regnet(**kw) -> nn.Module:
    from transformers import RegNetConfig, RegNetForImageClassification

    return RegNetForImageClassification(RegNetConfig(**kw))


def regnet_y_400mf(size: int = 64) -> ModelSpec:
    """RegNetY-400MF's shape: stem 32, widths 48/104/208/440, depths 1/3/6/6, groups of 8."""
    make = partial(
        _regnet, embedding_size=32, hidden_sizes=[48, 104, 208, 440], depths=[1, 3, 6, 6],
        groups_width=8, layer_type="y", num_labels=100,
    )  # fmt: skip
    return _spec("hf-regnet-y-400mf", make, _regnet_units, size)


def regnet_small() -> ModelSpec:
    make = partial(
        _regnet, embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 2, 1],
        groups_width=8, layer_type="y", num_labels=10,
    )  # fmt: skip
    return _spec("hf-regnet", make, _regnet_units, 32)


def resnet_small() -> ModelSpec:
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = dict(
        embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1],
        layer_type="bottleneck", num_labels=10,
    )  # fmt: skip
    make = partial(lambda: ResNetForImageClassification(ResNetConfig(**cfg)))
    return _spec("hf-resnet", make, _resnet_units, 32)


def convnext_small() -> ModelSpec:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], num_labels=10)
    make = partial(lambda: ConvNextForImageClassification(ConvNextConfig(**cfg)))
    return _spec("hf-convnext", make, _convnext_units, 32)


def vit_small() -> ModelSpec:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
        num_attention_heads=2, intermediate_size=64, num_labels=10,
    )  # fmt: skip
    make = partial(lambda: ViTForImageClassification(ViTConfig(**cfg)))
    return _spec("hf-vit", make, _vit_units, 32)


def swin_small() -> ModelSpec:
    from transformers import SwinConfig, SwinForImageClassification

    cfg = dict(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[1, 2],
        window_size=4, num_labels=10,
    )  # fmt: skip
    make = partial(lambda: SwinForImageClassification(SwinConfig(**cfg)))
    return _spec("hf-swin", make, _swin_units, 32)


HF_SPECS = {
    "regnet": regnet_small,
    "resnet": resnet_small,
    "convnext": convnext_small,
    "vit": vit_small,
    "swin": swin_small,
}


# Plain nn.Module factories (no ModelSpec): ``--model oracle_models:convnext_module --input
# 3x32x32``; the unit chain is found by kitcore.registry.discover_units.
def regnet_module() -> nn.Module:
    return regnet_small().build(torch.get_default_device())


def resnet_module() -> nn.Module:
    return resnet_small().build(torch.get_default_device())


def convnext_module() -> nn.Module:
    return convnext_small().build(torch.get_default_device())


def vit_module() -> nn.Module:
    return vit_small().build(torch.get_default_device())


def swin_module() -> nn.Module:
    return swin_small().build(torch.get_default_device())
