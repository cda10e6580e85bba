"""VISSL-layout SEER models and checkpoint files, written the way VISSL writes them.

The module tree follows ClassyVision's AnyNet (``SimpleStemIN``, ``ResBottleneckBlock`` with
its ``BottleneckTransform`` and ``SqueezeAndExcitationLayer``), VISSL's ``regnet_fsdp``
feature blocks (``conv1``, ``res2``…, ``block{s}-part{g}`` groups from ``stage_checkpoints``)
and VISSL's ``SwAVPrototypesHead``, so that ``state_dict()`` gives the key names a SEER
checkpoint holds — from PyTorch's own naming, not from ``ckpt.vissl``'s mapping. Widths come
from our preset's RegNetConfig. Files: ``vissl/utils/checkpoint.py``'s consolidated layout and
its sliced one (``<stem>_layers/<sha1(key)>.torch`` + a slice list of absolute paths).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(w_in, w_out, k, stride, groups=1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(w_in, w_out, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(w_out),
        nn.ReLU(),
    )


class _SE(nn.Module):
    def __init__(self, w: int, w_se: int) -> None:
        super().__init__()
        self.excitation = nn.Sequential(
            nn.Conv2d(w, w_se, 1, bias=True), nn.ReLU(), nn.Conv2d(w_se, w, 1, bias=True),
            nn.Sigmoid(),
        )  # fmt: skip

    def forward(self, x):
        return x * self.excitation(F.adaptive_avg_pool2d(x, 1))


class _Transform(nn.Sequential):
    def __init__(self, spec) -> None:
        super().__init__()
        self.a = _conv_bn_relu(spec.w_in, spec.w_b, 1, 1)
        self.b = _conv_bn_relu(spec.w_b, spec.w_b, 3, spec.stride, spec.groups)
        self.se = _SE(spec.w_b, round(0.25 * spec.w_in))  # SE width from the block input
        self.c = nn.Conv2d(spec.w_b, spec.w_out, 1, bias=False)
        self.final_bn = nn.BatchNorm2d(spec.w_out)


class _Block(nn.Module):
    def __init__(self, spec) -> None:
        super().__init__()
        self.proj_block = spec.w_in != spec.w_out or spec.stride != 1
        if self.proj_block:
            self.proj = nn.Conv2d(spec.w_in, spec.w_out, 1, stride=spec.stride, bias=False)
            self.bn = nn.BatchNorm2d(spec.w_out)
        self.f = _Transform(spec)

    def forward(self, x):
        shortcut = self.bn(self.proj(x)) if self.proj_block else x
        return F.relu(shortcut + self.f(x))


class _Stem(nn.Sequential):
    def __init__(self, w: int) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, w, 3, 2)


class VisslSwAV(nn.Module):
    """``trunk`` (``_feature_blocks``) and ``heads`` (a ModuleList of one SwAV head) as VISSL
    builds them. ``parts[s - 1]``: VISSL's ``stage_checkpoints`` of stage ``s`` (block
    indices where a group ends; ``None`` = the plain ClassyVision stage, no groups)."""

    def __init__(self, preset, parts: list[list[int] | None] | None = None) -> None:
        super().__init__()
        config = preset.regnet
        stages: dict[int, list] = {}
        for stage, _, spec in config.blocks():
            stages.setdefault(stage, []).append(spec)
        blocks = {"conv1": _Stem(config.stem_width)}
        for s, specs in stages.items():
            stage = nn.Sequential()
            groups = (parts or [None] * len(stages))[s - 1]
            if groups is None:
                for i, spec in enumerate(specs):
                    stage.add_module(f"block{s}-{i}", _Block(spec))
            else:
                ends = [*groups, len(specs)] if groups[-1:] != [len(specs)] else groups
                begin = 0
                for g, end in enumerate(ends):
                    part = nn.Sequential()
                    for i in range(begin, end):
                        part.add_module(f"block{s}-{i}", _Block(specs[i]))
                    stage.add_module(f"block{s}-part{g}", part)
                    begin = end
            blocks[f"res{s + 1}"] = stage
        self.trunk = nn.Module()
        self.trunk._feature_blocks = nn.ModuleDict(blocks)
        dims = preset.head_dims
        layers: list[nn.Module] = []
        for j in range(len(dims) - 1):
            layers.append(nn.Linear(dims[j], dims[j + 1]))
            if j < len(dims) - 2:
                layers.append(nn.ReLU(inplace=True))
        head = nn.Module()
        head.projection_head = nn.Sequential(*layers)
        head.prototypes0 = nn.Linear(dims[-1], preset.num_prototypes, bias=False)
        self.heads = nn.ModuleList([head])

    def forward(self, x):
        """(N, 3, H, W) → (pooled trunk features (N, w), prototype scores (N, K))."""
        for block in self.trunk._feature_blocks.values():
            x = block(x)
        features = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, w)
        z = F.normalize(self.heads[0].projection_head(features), dim=1, p=2)
        return features, self.heads[0].prototypes0(z)


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter and buffer random (BatchNorm variances positive), so that a tensor put
    in the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.dtype == torch.int64:
            t.copy_(torch.randint(0, 1000, t.shape, generator=g))
        elif name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        else:
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return model


def vissl_state(model: VisslSwAV) -> tuple[dict, dict]:
    """(trunk state dict, heads state dict with VISSL's ``0.`` head prefix)."""
    return model.trunk.state_dict(), model.heads.state_dict()


def save_consolidated(path: Path, trunk: dict, heads: dict) -> Path:
    content = {
        "type": "consolidated",
        "classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": heads}}},
        "iteration": 7,
        "phase_idx": 1,
    }
    torch.save(content, path)
    return path


def save_sliced(path: Path, trunk: dict, heads: dict) -> Path:
    """VISSL's sliced layout: one file per key named by the sha1 of the key, and a slice list
    holding their absolute paths."""
    folder = path.with_name(path.stem + "_layers")
    folder.mkdir(parents=True, exist_ok=True)
    listed: dict[str, dict[str, str]] = {"trunk": {}, "heads": {}}
    for section, sd in (("trunk", trunk), ("heads", heads)):
        for key, t in sd.items():
            f = folder / f"{hashlib.sha1(key.encode()).hexdigest()}.torch"
            torch.save({"type": "slice", "weight": t.clone()}, f)
            listed[section][key] = os.path.abspath(f)
    torch.save({"type": "slice_list", "classy_state_dict": {"base_model": {"model": listed}}},
               path)  # fmt: skip
    return path
