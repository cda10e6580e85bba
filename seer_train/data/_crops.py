"""Multi-crop geometry on the CPU: RandomResizedCrop + horizontal flip per crop, to uint8.

Geometry runs in the loader workers because it shrinks the data: a 1,000 × 800 photo becomes
2 × 160² + 4 × 96² pixels (a sixth of it) before it is pinned and copied to the device.
Photometric augmentation runs batched on the device (``_augment.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

SEER_SIZES = (160, 160, 96, 96, 96, 96)
GLOBAL_SCALE = (0.14, 1.0)  # SwAV's large crops: 14 %..100 % of the image area
LOCAL_SCALE = (0.05, 0.14)  # small crops: 5 %..14 %


@dataclass(frozen=True, slots=True, kw_only=True)
class MultiCropSpec:
    """The crops of one training image (SPEC §3); defaults are SEER's 2 × 160 px + 4 × 96 px.

    sizes: side in pixels of each output crop, in order (the loader yields one batch per crop).
    scales: (min, max) fraction of the image *area* each crop covers, one pair per crop.
    ratio: (min, max) aspect ratio w/h of a crop before resizing, sampled log-uniformly.
    flip_p: probability of a horizontal flip, per crop.
    """

    sizes: tuple[int, ...] = SEER_SIZES
    scales: tuple[tuple[float, float], ...] = (GLOBAL_SCALE,) * 2 + (LOCAL_SCALE,) * 4
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        if not self.sizes or any(s < 1 for s in self.sizes):
            raise ValueError(f"crop sizes must be positive pixels, got {self.sizes}")
        if len(self.scales) != len(self.sizes):
            raise ValueError(f"{len(self.sizes)} crop sizes but {len(self.scales)} scale ranges")
        for lo, hi in self.scales:
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"scale range must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio range must satisfy 0 < min <= max, got {self.ratio}")
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")

    @classmethod
    def from_sizes(
        cls,
        sizes: tuple[int, ...],
        global_scale: tuple[float, float] = GLOBAL_SCALE,
        local_scale: tuple[float, float] = LOCAL_SCALE,
    ) -> MultiCropSpec:
        """Crops of the largest size get ``global_scale``, all others ``local_scale``.

        ``MultiCropSpec.from_sizes(PRESETS["tiny"].crop_sizes)`` is 2 × 64 px at (0.14, 1)
        + 4 × 32 px at (0.05, 0.14).
        """
        sizes = tuple(int(s) for s in sizes)
        big = max(sizes, default=0)
        scales = tuple(global_scale if s == big else local_scale for s in sizes)
        return cls(sizes=sizes, scales=scales)

    @property
    def pixels_per_image(self) -> int:
        """Output pixels (per channel) of one image's full crop set."""
        return sum(s * s for s in self.sizes)


def sample_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, w, h) in pixels, torchvision's algorithm.

    Up to 10 tries of (area fraction ~ U(scale), log aspect ~ U(log ratio)); the first box that
    fits is placed uniformly. If none fits (very elongated images), the largest centred box
    whose aspect is clamped to ``ratio``. All 10 tries are drawn at once, so a given ``rng``
    state always consumes the same amount of randomness.
    """
    area = width * height
    target = area * rng.uniform(scale[0], scale[1], size=10)
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=10))
    ws = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    hs = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    pos = rng.random(2)
    fits = np.flatnonzero((ws > 0) & (ws <= width) & (hs > 0) & (hs <= height))
    if fits.size:
        w, h = int(ws[fits[0]]), int(hs[fits[0]])
        return int(pos[0] * (width - w + 1)), int(pos[1] * (height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def multicrop(
    img: Image.Image, spec: MultiCropSpec, rng: np.random.Generator
) -> list[torch.Tensor]:
    """The crops of ``img`` (RGB) per ``spec``: one uint8 tensor (3, s_i, s_i) per crop.

    Crop and resize are one PIL call (``resize(box=...)``, bilinear with antialiasing when
    shrinking), so only the output pixels are computed.
    """
    out = []
    for size, scale in zip(spec.sizes, spec.scales, strict=True):
        left, top, w, h = sample_crop_box(img.width, img.height, scale, spec.ratio, rng)
        crop = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
        if rng.random() < spec.flip_p:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        # np.array copies: torch wants a writable buffer. (H, W, 3) -> (3, H, W)
        out.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1))
    return out
