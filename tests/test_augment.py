"""Photometric augmentation of crop batches with kornia (seer_train.data._augment)."""

import pytest
import torch

from seer_train.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PHOTOMETRIC_PRESETS,
    PhotometricAugment,
    PhotometricConfig,
)


def _uint8(b=8, s=32, seed=0):
    return torch.randint(0, 256, (b, 3, s, s), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )


def test_augment_shapes_dtype_and_normalisation():
    x = [_uint8(8, 64), _uint8(8, 32)]
    identity = PhotometricAugment(PhotometricConfig(jitter_p=0.0, gray_p=0.0, blur_p=0.0))
    mean, std = (
        torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
    )
    for xi, yi in zip(x, identity(x), strict=True):
        assert yi.dtype == torch.float32 and yi.shape == xi.shape
        torch.testing.assert_close(yi, (xi.float() / 255 - mean) / std)
    out = PhotometricAugment()(x, seed=0)
    assert [o.shape for o in out] == [xi.shape for xi in x] and out[0].dtype == torch.float32
    plain = identity(x[0])
    changed = (out[0] - plain).abs().flatten(1).amax(1) > 1e-3
    assert changed.float().mean() > 0.5  # p 0.8 jitter, p 0.5 blur: most images change
    assert (out[0] >= -mean / std - 1e-4).all() and (out[0] <= (1 - mean) / std + 1e-4).all()


def test_augment_seed_is_reproducible_and_leaves_global_rng_alone():
    aug, x = PhotometricAugment(), _uint8(16, 32)
    torch.manual_seed(123)
    a = aug(x, seed=9)
    after = torch.rand(1)
    torch.manual_seed(123)
    b = aug(x, seed=9)
    assert torch.equal(a, b) and torch.equal(after, torch.rand(1))
    assert not torch.equal(a, aug(x, seed=10))
    blurred = PhotometricAugment(PhotometricConfig(jitter_p=0, gray_p=0, blur_p=1.0))(x, seed=0)
    assert (
        blurred.std()
        < PhotometricAugment(PhotometricConfig(jitter_p=0, gray_p=0, blur_p=0))(x).std()
    )
    with pytest.raises(ValueError, match="uint8"):
        aug(x.float())


def test_blur_kernel_is_odd_and_scales_with_the_crop():
    cfg = PhotometricConfig()
    assert [cfg.blur_kernel(s) for s in (160, 96, 64, 32)] == [17, 9, 7, 3]


def test_photometric_presets():
    """``seer`` is SPEC §3's; ``blur`` leaves every crop's colour alone; ``mild`` moves colours
    less than ``seer``."""
    assert PHOTOMETRIC_PRESETS["seer"] == PhotometricConfig()
    x = _uint8(64, 32)
    plain = PhotometricAugment(PhotometricConfig(jitter_p=0, gray_p=0, blur_p=0))(x)
    shift = {}
    for name in ("seer", "mild", "blur"):
        y = PhotometricAugment(PHOTOMETRIC_PRESETS[name])(x, seed=0)
        shift[name] = (y - plain).mean((2, 3)).abs().mean().item()  # per-image colour change
    assert shift["blur"] < 0.02 < shift["mild"] < shift["seer"]
