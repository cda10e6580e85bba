"""SwAV projection head, prototypes and the multi-crop model wrapper (SPEC §3)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwAVHead", "SwAVModel", "resolution_groups"]


class SwAVHead(nn.Module):
    """MLP head: Linear → ReLU → … → Linear over ``dims`` (biases, no BatchNorm), then L2-norm.

    ``dims = [w_trunk, hidden..., out]``; (N, dims[0]) → (N, dims[-1]) with unit-norm rows.
    """

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"head dims need an input and an output width, got {list(dims)}")
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                layers.append(nn.ReLU(inplace=True))
        self.mlp = nn.Sequential(*layers)
        self.dims = tuple(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=1, p=2)  # (N, out)


def resolution_groups(crops: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of consecutive crops sharing a spatial size (SwAV reference)."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class SwAVModel(nn.Module):
    """Trunk → head → prototypes, over a multi-crop list.

    Input: a tensor (N, 3, H, W) or a list of crop batches, each (B, 3, H_i, W_i). Consecutive
    crops of one resolution are concatenated into a group, and the trunk takes all groups in one
    pass (each unit called once; no padding, BatchNorm statistics per group). Output
    ``(z, scores)``: ``z`` is (sum of crop batches, out) L2-normalised and
    ``scores = prototypes(z)`` is (…, K), crop-major (all of crop 0, then crop 1, …).
    """

    def __init__(self, trunk: nn.Module, head: SwAVHead, num_prototypes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.prototypes = nn.Linear(head.dims[-1], num_prototypes, bias=False)

    def forward(
        self, crops: torch.Tensor | Sequence[torch.Tensor], features_only: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``features_only=True`` returns the pooled trunk features (sum B_i, w_trunk) alone
        (linear evaluation), through the root module so that FSDP's hooks run as in training."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        groups = [torch.cat(crops[s:e]) for s, e in resolution_groups(crops)]
        features = self.trunk(groups)  # (sum B_i, w_trunk)
        if features_only:
            return features
        z = self.head(features)  # (sum B_i, out)
        return z, self.prototypes(z)  # (sum B_i, K)
