"""Photometric augmentation of crop batches on the training device, with kornia.

SwAV's per-crop colour distortion (SPEC §3) is per-pixel arithmetic on every crop: on a CPU
worker it costs more than decoding, on a GPU it is a few elementwise kernels per batch. So the
loader ships uint8 crops (4× fewer bytes than float) and this module finishes them on device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import kornia.augmentation as K
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, slots=True, kw_only=True)
class PhotometricConfig:
    """SwAV / SEER colour distortion (SPEC §3 defaults).

    jitter: torchvision ColorJitter (brightness, contrast, saturation, hue), applied with
    probability jitter_p; gray_p: probability of grayscale; blur_p, blur_sigma: Gaussian blur
    probability and its sigma range in pixels of the crop; blur_kernel_frac: kernel side as a
    fraction of the crop side (rounded to odd, at least 3: 17 px at 160, 9 at 96, 3 at 32);
    mean, std: per-channel normalisation of [0, 1] values.
    """

    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("jitter_p", "gray_p", "blur_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}")

    def blur_kernel(self, size: int) -> int:
        """Odd Gaussian kernel side for a crop of ``size`` px."""
        return max(3, int(self.blur_kernel_frac * size) | 1)


PHOTOMETRIC_PRESETS: dict[str, PhotometricConfig] = {
    # SEER / SwAV (SPEC §3): the default.
    "seer": PhotometricConfig(),
    # Half the jitter, no blur: for small models and short runs, where SEER's distortion
    # leaves two crops of one image too little in common to start from (see ``make demo``).
    "mild": PhotometricConfig(jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.0),
    # Blur only: colours left as they are (data whose colours carry no per-image signal).
    "blur": PhotometricConfig(jitter_p=0.0, gray_p=0.0),
}


class PhotometricAugment(nn.Module):
    """uint8 crops (B, 3, s, s) -> augmented, normalised float32 (B, 3, s, s), on their device.

    Per image, independently: colour jitter with p 0.8 (kornia ``ColorJitter``: torchvision's
    blend formulas; ``ColorJiggle`` uses different ones), grayscale with p 0.2, Gaussian blur
    with p 0.5 and sigma ~ U(0.1, 2.0), then ImageNet normalisation. One difference from
    torchvision: kornia draws the order of the four jitter steps once per batch, not per image.

    Randomness: kornia has no per-module generator; it draws every parameter from torch's
    global **CPU** generator (the samplers stay on CPU here even when the module is moved, and
    only the small parameter tensors travel to the device). ``forward(x, seed=s)`` forks that
    generator, seeds it with ``s`` and restores it afterwards: the same crops and seed give the
    same output on any device, and the caller's random stream is untouched. Without ``seed``
    the global stream is used (set it with ``torch.manual_seed``).
    """

    def __init__(self, config: PhotometricConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or PhotometricConfig()
        b, c, s, h = cfg.jitter
        # Kept out of the module tree on purpose (plain tuple / dict): Module.to() would move
        # kornia's samplers to the device and switch them to that device's generator.
        self._color = (
            K.ColorJitter(b, c, s, h, p=cfg.jitter_p),
            K.RandomGrayscale(p=cfg.gray_p),
        )
        self._blur: dict[int, K.RandomGaussianBlur] = {}
        std = torch.tensor(cfg.std).view(1, 3, 1, 1)
        # (y - mean) / std as y * scale - shift, for y in [0, 1]: two in-place ops, no copies.
        self.register_buffer("_scale", 1.0 / std, persistent=False)
        self.register_buffer(
            "_shift", torch.tensor(cfg.mean).view(1, 3, 1, 1) / std, persistent=False
        )

    def _blur_for(self, size: int) -> K.RandomGaussianBlur:
        if size not in self._blur:
            k = self.config.blur_kernel(size)
            self._blur[size] = K.RandomGaussianBlur(
                (k, k), self.config.blur_sigma, p=self.config.blur_p
            )
        return self._blur[size]

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 crops (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        y = x.float().div_(255.0)  # (B, 3, H, W) in [0, 1]
        for op in self._color:
            y = op(y)
        y = self._blur_for(x.shape[-1])(y)
        return y.mul_(self._scale).sub_(self._shift)  # (B, 3, H, W), ~zero mean, unit std

    def forward(
        self, crops: torch.Tensor | Sequence[torch.Tensor], seed: int | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """Augment one crop batch, or the loader's list of them (one per crop, same order).

        Consecutive crops of one size go through kornia as one batch (2 calls instead of 6 for
        SEER's 2 + 4 crops: kornia's per-call cost is large next to small crops); every image
        still draws its own parameters.
        """
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.default_generator.manual_seed(seed)  # CPU only: where kornia samples
            if isinstance(crops, torch.Tensor):
                return self._one(crops)
            out: list[torch.Tensor] = []
            start = 0
            while start < len(crops):
                end = start + 1
                while end < len(crops) and crops[end].shape == crops[start].shape:
                    end += 1
                group = self._one(torch.cat(list(crops[start:end])))  # (n·B, 3, s, s)
                out += group.chunk(end - start)
                start = end
            return out
