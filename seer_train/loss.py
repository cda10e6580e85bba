"""The SwAV loss with distributed Sinkhorn-Knopp codes (SPEC §3).

Shapes: ``scores`` is (n_crops · B, K) crop-major (all of crop 0, then crop 1, …), the
prototype scores of L2-normalised embeddings; ``B`` images per rank, ``K`` prototypes.

Codes are computed for the assignment crops (0 and 1) together: their Sinkhorn problems are
stacked into one (A, K, B) tensor, so each iteration all-reduces one (A, K) row-sum tensor
instead of A separate ones. Collectives per step: 1 MAX (A elements) + 1 SUM (A + 1
elements: the normaliser and the global batch size) + ``iters`` SUM of A·K FP32 elements,
whatever the number of assignment crops. The global batch is summed rather than assumed to be
``world · B``, so ranks may hold different numbers of images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["SwAVLossConfig", "sinkhorn", "swav_loss"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SwAVLossConfig:
    """SwAV hyper-parameters as SEER trained (SPEC §3).

    crops_for_assign: crops whose codes are targets; temperature: τ of the softmax over
    prototype scores; epsilon: entropic regularisation ε of Sinkhorn-Knopp; iters: its
    iterations.
    """

    crops_for_assign: tuple[int, ...] = (0, 1)
    temperature: float = 0.1
    epsilon: float = 0.03
    iters: int = 10

    def __post_init__(self) -> None:
        if not self.crops_for_assign:
            raise ValueError("SwAV needs at least one assignment crop")
        if self.temperature <= 0 or self.epsilon <= 0 or self.iters < 1:
            raise ValueError("SwAV needs temperature > 0, epsilon > 0 and iters >= 1")


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


@torch.no_grad()
def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """FP32 for FP16/BF16/FP32; FP64 stays FP64 (reference runs compare at FP64 round-off)."""
    return torch.promote_types(dtype, torch.float32)


def sinkhorn(scores: torch.Tensor, epsilon: float = 0.03, iters: int = 10, group=None):
    """Equal-partition soft codes for ``scores`` (A, B, K) → (A, B, K), FP32 (FP64 for FP64
    scores), rows sum to 1.

    Solves A independent problems over the *global* batch (every rank's B rows): the codes
    of each problem give every prototype an equal share of the batch. The exponent is
    shifted by the global maximum of each problem (one MAX all-reduce), so ``exp`` cannot
    overflow in FP32 whatever ε.
    """
    scores = scores.to(_at_least_fp32(scores.dtype))
    a, b, _ = scores.shape
    shift = _all_reduce(scores.amax(dim=(1, 2)), dist.ReduceOp.MAX, group)  # (A,)
    q = torch.exp((scores - shift.view(a, 1, 1)) / epsilon).transpose(1, 2)  # (A, K, B)
    k = q.shape[1]
    totals = _all_reduce(torch.cat([q.sum(dim=(1, 2)), q.new_tensor([float(b)])]), group=group)
    q /= totals[:a].view(a, 1, 1)
    global_b = totals[a]
    # Cosine scores (|s| <= 1) at ε 0.03 stay above FP32's smallest normal after the shift;
    # scores far outside that range may underflow a whole row or column to 0, which the
    # clamps leave at 0 (that prototype or image gets no mass) instead of turning into NaN.
    tiny = torch.finfo(q.dtype).tiny
    for _ in range(iters):
        rows = _all_reduce(q.sum(dim=2, keepdim=True), group=group)  # (A, K, 1): global
        q *= (1.0 / k) / rows.clamp_min(tiny)
        q *= (1.0 / global_b) / q.sum(dim=1, keepdim=True).clamp_min(tiny)  # columns: local
    q *= global_b  # every column (one image's code) sums to 1
    return q.transpose(1, 2)  # (A, B, K)


def swav_loss(
    scores: torch.Tensor, n_crops: int, cfg: SwAVLossConfig | None = None, group=None
) -> torch.Tensor:
    """SwAV swapped-prediction loss over a crop-major (n_crops · B, K) score matrix.

    For each assignment crop i with codes q_i: the mean over the other crops p of
    ``-mean_b Σ_k q_i log softmax(scores_p / τ)``; the result is the mean over assignment
    crops. Scores are taken in FP32 whatever their dtype (FP64 stays FP64).
    """
    cfg = cfg or SwAVLossConfig()
    if scores.shape[0] % n_crops:
        raise ValueError(f"{scores.shape[0]} score rows do not split into {n_crops} crops")
    if max(cfg.crops_for_assign) >= n_crops or n_crops < 2:
        raise ValueError(f"assignment crops {cfg.crops_for_assign} need more than {n_crops}")
    per_crop = scores.to(_at_least_fp32(scores.dtype)).chunk(n_crops)  # n_crops × (B, K)
    codes = sinkhorn(
        torch.stack([per_crop[i].detach() for i in cfg.crops_for_assign]),
        cfg.epsilon,
        cfg.iters,
        group,
    )
    log_p = [F.log_softmax(s / cfg.temperature, dim=1) for s in per_crop]
    total = scores.new_zeros((), dtype=per_crop[0].dtype)
    for q, i in zip(codes, cfg.crops_for_assign, strict=True):
        others: Sequence[int] = [p for p in range(n_crops) if p != i]
        total = total + sum(-(q * log_p[p]).sum(dim=1).mean() for p in others) / len(others)
    return total / len(cfg.crops_for_assign)
