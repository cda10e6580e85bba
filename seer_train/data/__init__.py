"""The SwAV multi-crop data pipeline for uncurated images (SPEC §3).

Datasets give RGB ``PIL`` images (:class:`ImageFolder`, :class:`LabelledImageFolder`,
:class:`SyntheticImages`); :func:`pretrain_loader` turns them into per-rank, resumable batches
of uint8 crops (geometry on CPU workers, :class:`MultiCropSpec`); :class:`PhotometricAugment`
finishes each crop batch on the training device with kornia. :func:`eval_loader` feeds linear
evaluation. Undecodable files raise :class:`BadImage` and are skipped and counted by the loaders.

    spec = MultiCropSpec.from_sizes(PRESETS["tiny"].crop_sizes)
    augment = PhotometricAugment().to(device)
    for crops, info in pretrain_loader(ds, spec, 32, rank, world, seed, start_step=step):
        views = augment([c.to(device, non_blocking=True) for c in crops])
"""

from ._augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PHOTOMETRIC_PRESETS,
    PhotometricAugment,
    PhotometricConfig,
)
from ._crops import MultiCropSpec, multicrop, sample_crop_box
from ._images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    SKIP_REASONS,
    BadImage,
    DataError,
    ImageFolder,
    LabelledImageFolder,
    decode_rgb,
    find_images,
)
from ._loader import BatchInfo, EvalBatch, ShardedBatchSampler, eval_loader, pretrain_loader
from ._synthetic import FAMILIES, SyntheticImages

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "FAMILIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "PHOTOMETRIC_PRESETS",
    "SKIP_REASONS",
    "BadImage",
    "BatchInfo",
    "DataError",
    "EvalBatch",
    "ImageFolder",
    "LabelledImageFolder",
    "MultiCropSpec",
    "PhotometricAugment",
    "PhotometricConfig",
    "ShardedBatchSampler",
    "SyntheticImages",
    "decode_rgb",
    "eval_loader",
    "find_images",
    "multicrop",
    "pretrain_loader",
    "sample_crop_box",
]
