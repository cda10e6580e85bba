"""Loaders: deterministic per-rank shards, exact resume, counted skips of bad images.

Three rules make a run reproducible and resumable (see :func:`pretrain_loader`):

- **sharding**: epoch ``e`` is a permutation of all indices seeded by ``(seed, e)``; global step
  ``k`` of the epoch takes the next ``world_size × batch_size`` entries of it and rank ``r`` the
  ``r``-th block of ``batch_size``. The tail (``len % (world × B)`` images) is dropped, a
  different random set each epoch, so every rank runs the same number of full steps.
- **crops**: every random choice for an image comes from a generator seeded by
  ``(seed, epoch, index)``, so a sample's crops do not depend on the worker that made them,
  the number of workers, the rank or the batch size.
- **skips**: an undecodable image ``i`` is replaced by the next decodable one ``i+1, i+2, ...``
  (mod len) and counted by reason; the batch keeps its size and the outcome depends only on the
  files. Counts travel inside the batch, so they reach the training process from any worker.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ._augment import IMAGENET_MEAN, IMAGENET_STD
from ._crops import MultiCropSpec, multicrop
from ._images import BadImage, DataError


class ImageDataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> Image.Image: ...


class LabelledDataset(ImageDataset, Protocol):
    def label(self, i: int) -> int: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchInfo:
    """Where a pretraining batch comes from, and what was skipped to make it.

    epoch, step: global step ``step`` (counted from the start of training, across epochs) is
    step ``step_in_epoch`` of ``epoch``. indices: (B,) int64 dataset indices the sampler chose;
    used: (B,) the indices actually decoded (differ where a bad image was replaced).
    skipped: {reason: count} for this batch; skipped_total: summed over every batch this
    iterator yielded (since ``start_step``, not since step 0).
    """

    epoch: int
    step: int
    step_in_epoch: int
    indices: torch.Tensor
    used: torch.Tensor
    skipped: dict[str, int]
    skipped_total: dict[str, int] = field(default_factory=dict)


class ShardedBatchSampler:
    """Rank ``rank``'s batches of dataset indices, epoch after epoch, from ``start_step``.

    Yields lists of ``(epoch, step, index)`` keys (``step`` global). ``steps_per_epoch`` is
    ``num_samples // (world_size × batch_size)``; the epoch's permutation is NumPy's PCG64
    seeded by ``(seed, epoch)``. Same arguments => same batches, whatever ``start_step``.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_step: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1 or start_step < 0:
            raise ValueError(
                f"need batch_size >= 1 and start_step >= 0, got {batch_size}, {start_step}"
            )
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed, self.start_step = rank, world_size, seed, start_step
        self.steps_per_epoch = num_samples // (world_size * batch_size)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{num_samples} images are fewer than one global batch ({world_size} ranks × "
                f"{batch_size}): use a smaller batch size or more images"
            )

    def permutation(self, epoch: int) -> np.ndarray:
        """All dataset indices in epoch ``epoch``'s order, (num_samples,) int64."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def indices(self, step: int, perm: np.ndarray | None = None) -> np.ndarray:
        """This rank's (batch_size,) dataset indices at global step ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch) if perm is None else perm
        start = (k * self.world_size + self.rank) * self.batch_size
        return perm[start : start + self.batch_size]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch, perm = -1, None
        for step in itertools.count(self.start_step):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                perm = self.permutation(epoch)
            yield [(epoch, step, int(i)) for i in self.indices(step, perm)]


class _Decoder:
    """``dataset[i]``, or the next decodable image after it, and the reasons it skipped."""

    def __init__(self, dataset: ImageDataset, max_consecutive_bad: int) -> None:
        self.dataset = dataset
        self.max_tries = max(1, min(max_consecutive_bad, len(dataset)))
        self._bad: dict[int, str] = {}  # index -> reason, per process: each file is read once

    def __call__(self, i: int) -> tuple[Image.Image, int, list[str]]:
        n, reasons = len(self.dataset), []
        for t in range(self.max_tries):
            j = (i + t) % n
            if j in self._bad:
                reasons.append(self._bad[j])
                continue
            try:
                return self.dataset[j], j, reasons
            except BadImage as e:
                self._bad[j] = e.reason
                reasons.append(e.reason)
        raise DataError(
            f"{self.max_tries} undecodable images in a row from index {i} of {self.dataset!r} "
            f"(reasons: {dict(Counter(reasons))}): check the folder holds images"
        )


class _PretrainSamples:
    """Map-style dataset over sampler keys: key -> (crops, key, used index, skip reasons)."""

    def __init__(self, dataset: ImageDataset, spec: MultiCropSpec, seed: int, max_bad: int):
        self.decode, self.spec, self.seed = _Decoder(dataset, max_bad), spec, seed

    def __getitem__(self, key: tuple[int, int, int]):
        epoch, _, index = key
        img, used, reasons = self.decode(index)
        rng = np.random.default_rng([self.seed, epoch, index])
        return multicrop(img, self.spec, rng), key, used, reasons


def _collate_pretrain(samples: list) -> tuple[list[torch.Tensor], BatchInfo]:
    crops = [torch.stack(c) for c in zip(*(s[0] for s in samples), strict=True)]  # (B, 3, s, s)
    (epoch, step, _), skipped = samples[0][1], Counter()
    for s in samples:
        skipped.update(s[3])
    info = BatchInfo(
        epoch=epoch,
        step=step,
        step_in_epoch=-1,  # filled in by the iterator, which knows steps_per_epoch
        indices=torch.tensor([s[1][2] for s in samples]),
        used=torch.tensor([s[2] for s in samples]),
        skipped=dict(skipped),
    )
    return crops, info


def _loader(dataset, batch_sampler, collate, num_workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Workers only decode and crop; 4 batches in flight each hide decode-time variance.
        prefetch_factor=4 if num_workers else None,
    )


def pretrain_loader(
    dataset: ImageDataset,
    spec: MultiCropSpec,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    start_step: int = 0,
    num_workers: int = 0,
    *,
    pin_memory: bool = False,
    max_consecutive_bad: int = 64,
) -> Iterator[tuple[list[torch.Tensor], BatchInfo]]:
    """Endless SwAV multi-crop batches for rank ``rank`` of ``world_size``, from ``start_step``.

    Yields ``(crops, info)``: ``crops[c]`` is a uint8 tensor (B, 3, s_c, s_c) for crop ``c`` of
    ``spec`` (photometric augmentation is :class:`PhotometricAugment`'s job, on device);
    ``info`` a :class:`BatchInfo`. Epochs follow each other without end; the training loop
    decides how many steps to take and breaks (``close()`` stops the workers at once).

    **Resume**: ``start_step`` is the global step to start from (``epoch × steps_per_epoch +
    step_in_epoch``); the batches equal those a run from step 0 yields at the same steps,
    for any ``num_workers``, as long as dataset, ``spec``, ``batch_size``, ``world_size`` and
    ``seed`` are unchanged. Memory: ``num_workers × 4`` batches of uint8 crops in flight.
    """
    sampler = ShardedBatchSampler(len(dataset), batch_size, rank, world_size, seed, start_step)
    samples = _PretrainSamples(dataset, spec, seed, max_consecutive_bad)
    loader = _loader(samples, sampler, _collate_pretrain, num_workers, pin_memory)
    return _with_totals(loader, sampler.steps_per_epoch)


def _with_totals(loader: DataLoader, steps_per_epoch: int):
    totals: Counter[str] = Counter()
    for crops, info in loader:
        totals.update(info.skipped)
        yield (
            crops,
            replace(info, step_in_epoch=info.step % steps_per_epoch, skipped_total=dict(totals)),
        )


class EvalBatch(NamedTuple):
    """images: (B, 3, size, size) float32, normalised; labels, indices: (B,) int64 (indices:
    the images actually decoded); skipped: {reason: count} in this batch."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: dict[str, int]


class _EvalSamples:
    """index -> (normalised image, label, used index, skip reasons); resize + centre crop."""

    def __init__(self, dataset: LabelledDataset, size: int, resize: int, max_bad: int):
        self.dataset, self.size, self.resize = dataset, size, resize
        self.decode = _Decoder(dataset, max_bad)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __getitem__(self, i: int):
        img, used, reasons = self.decode(i)
        # Shorter side -> `resize`, then the central size × size, as one resample: the centre
        # square of side size × (short / resize) in source pixels, straight to size × size.
        side = self.size * min(img.size) / self.resize
        left, top = (img.width - side) / 2, (img.height - side) / 2
        box = (left, top, left + side, top + side)
        out = img.resize((self.size, self.size), Image.BILINEAR, box=box)
        x = torch.from_numpy(np.array(out)).permute(2, 0, 1).float().div_(255)  # (3, s, s)
        return (x - self.mean) / self.std, self.dataset.label(used), used, reasons


def _collate_eval(samples: list) -> EvalBatch:
    skipped: Counter[str] = Counter()
    for s in samples:
        skipped.update(s[3])
    return EvalBatch(
        images=torch.stack([s[0] for s in samples]),
        labels=torch.tensor([s[1] for s in samples]),
        indices=torch.tensor([s[2] for s in samples]),
        skipped=dict(skipped),
    )


def eval_loader(
    dataset: LabelledDataset,
    size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    *,
    resize: int | None = None,
    pin_memory: bool = False,
    max_consecutive_bad: int = 64,
) -> DataLoader:
    """One pass over rank ``rank``'s images for linear evaluation, in index order.

    Returns a ``DataLoader`` (re-iterable, with ``len``) of :class:`EvalBatch`.

    Rank ``r`` gets indices ``r, r + world, r + 2·world, ...`` (ranks differ by at most one
    image; every image is on exactly one rank; the last batch may be short). Each image: shorter
    side resized to ``resize`` (default ``round(size / 0.875)``, the ImageNet 224/256 ratio),
    central ``size`` × ``size`` crop, ImageNet normalisation. Bad images are replaced as in
    :func:`pretrain_loader` and their replacement's label used; ``indices`` tells which.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    resize = resize or round(size / 0.875)
    if resize < size:
        raise ValueError(f"resize ({resize}) must be >= size ({size}) for a centre crop")
    mine = range(rank, len(dataset), world_size)
    batches: Sequence[list[int]] = [
        list(mine[k : k + batch_size]) for k in range(0, len(mine), batch_size)
    ]
    samples = _EvalSamples(dataset, size, resize, max_consecutive_bad)
    return _loader(samples, batches, _collate_eval, num_workers, pin_memory)
