"""The SEER learning-rate schedule (SPEC §3): linear warmup, then cosine on global progress.

With the SEER run (batch 7,936, 126,000 iterations) it gives 0.15 at iteration 0, rising
linearly to 9.3 = 0.3 × 7,936 / 256 at the end of warmup (4.3648 % of the run, ≈ 5,500
iterations), then ``final + ½ (peak − final)(1 + cos π t)`` with ``t = iteration / total`` the
progress through the *whole* run — so the cosine starts slightly below the peak (VISSL's
``interval_scaling: [rescaled, fixed]``) — ending at 0.0093.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SEERSchedule"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SEERSchedule:
    """Learning rate per iteration for a run of ``total_iters`` at global ``batch_size``.

    base_lr: peak LR per 256 images (scaled linearly with the batch);
    warmup_fraction: fraction of the run spent warming up;
    start_ratio / final_ratio: warmup start and final LR as fractions of the peak
    (SEER: 0.15 / 9.3 and 0.0093 / 9.3).
    """

    batch_size: int
    total_iters: int
    base_lr: float = 0.3
    warmup_fraction: float = 0.043648
    start_ratio: float = 0.15 / 9.3
    final_ratio: float = 0.0093 / 9.3

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.total_iters < 1:
            raise ValueError("the LR schedule needs batch_size >= 1 and total_iters >= 1")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")

    @property
    def peak_lr(self) -> float:
        return self.base_lr * self.batch_size / 256

    def __call__(self, iteration: int) -> float:
        peak = self.peak_lr
        t = iteration / self.total_iters
        if t < self.warmup_fraction:
            start = peak * self.start_ratio
            return start + (peak - start) * t / self.warmup_fraction
        final = peak * self.final_ratio
        return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * t))
