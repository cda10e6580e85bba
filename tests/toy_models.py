"""A non-RegNet model for the tests: a small ViT, exposed as an fsdpkit ModelSpec.

Addressed as ``--model toy_models:vit_spec`` (``tests/`` on the path), it proves the libraries
work on models that are not SEER's.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from fsdpkit import ModelSpec


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, tokens, dim)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 3, heads: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = PatchEmbed(dim, patch=8)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.classifier = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(x.mean(1))  # (N, classes)


def _build(device: torch.device) -> nn.Module:
    with torch.device(device):
        return TinyViT()


def _units(model: nn.Module) -> list[nn.Module]:
    return [model.embed, *model.blocks]


def _input(batch_size: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch_size, 3, 32, 32, device=device)


def vit_spec() -> ModelSpec:
    return ModelSpec(
        name="toy-vit",
        build=_build,
        example_input=_input,
        units=_units,
        description="4-unit ViT for tests",
        info={"depth": 3, "dim": 32},
    )


def not_a_spec() -> int:
    return 42


def empty_units_spec() -> ModelSpec:
    return ModelSpec(name="empty", build=_build, example_input=_input, units=lambda m: [])


def foreign_unit_spec() -> ModelSpec:
    return ModelSpec(name="foreign", build=_build, example_input=_input, units=_foreign_units)


def _foreign_units(model: nn.Module) -> list[nn.Module]:
    return [nn.Linear(1, 1)]


def repeated_unit_spec() -> ModelSpec:
    return ModelSpec(name="repeated", build=_build, example_input=_input, units=partial(_repeat, 2))


def _repeat(n: int, model: nn.Module) -> list[nn.Module]:
    return [model.embed] * n
