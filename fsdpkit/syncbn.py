"""SyncBatchNorm on any backend (gloo/CPU as well as NCCL/CUDA), FP32 statistics, subgroups.

``torch.nn.SyncBatchNorm`` refuses CPU tensors. This one uses two generic collectives per
layer and step: forward all-gathers each rank's per-channel ``(mean, M2, count)`` and combines
them exactly (Chan et al.'s parallel variance, no E[x²]−E[x]² cancellation); backward
all-reduces ``(Σ dy, Σ dy·x̂)``. Statistics and normalisation run in FP32 whatever the input
dtype (FP64 input: FP64); the output has the input's dtype. Communication per layer:
``world·(2C+1)`` FP32 elements gathered in forward, ``2C`` reduced in backward (C channels).

Weight and bias gradients are local sums, as in ``torch.nn.SyncBatchNorm``: data-parallel
averaging (FSDP's reduce-scatter, DDP's all-reduce) makes them global.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import FsdpkitError

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """FP32 for FP16/BF16/FP32 input; FP64 input keeps FP64 (reference runs)."""
    return torch.promote_types(dtype, torch.float32)


def _shape(x: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)  # broadcast a (C,) vector over (N, C, *)


class _SyncBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        x = x.to(_at_least_fp32(x.dtype))
        dims = _reduce_dims(x)
        n_local = x.numel() // x.shape[1]
        mean_l = x.mean(dims)
        m2_l = (x - mean_l.view(_shape(x))).square().sum(dims)
        local = torch.cat([mean_l, m2_l, mean_l.new_tensor([float(n_local)])])  # (2C+1,)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        gathered = torch.stack(parts)  # (world, 2C+1)
        c = x.shape[1]
        means, m2s, counts = gathered[:, :c], gathered[:, c : 2 * c], gathered[:, 2 * c :]
        n = counts.sum()
        mean = (means * counts).sum(0) / n
        m2 = (m2s + counts * (means - mean).square()).sum(0)
        var = m2 / n
        if running_mean is not None and momentum is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            unbiased = var * n / (n - 1).clamp_min(1)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        invstd = torch.rsqrt(var + eps)
        x_hat = (x - mean.view(_shape(x))) * invstd.view(_shape(x))
        out = x_hat
        if weight is not None:
            out = x_hat * weight.to(x.dtype).view(_shape(x)) + bias.to(x.dtype).view(_shape(x))
        ctx.save_for_backward(x_hat, invstd, weight, n)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, dy):
        x_hat, invstd, weight, n = ctx.saved_tensors
        dy = dy.to(x_hat.dtype)
        dims = _reduce_dims(dy)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * x_hat).sum(dims)
        sums = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(sums, group=ctx.group)
        c = sum_dy.numel()
        g_dy, g_dy_xhat = sums[:c] / n, sums[c:] / n
        scale = invstd if weight is None else invstd * weight.to(x_hat.dtype)
        dx = (dy - g_dy.view(_shape(dy)) - x_hat * g_dy_xhat.view(_shape(dy))) * scale.view(
            _shape(dy)
        )
        dw = db = None
        if weight is not None:
            dw, db = sum_dy_xhat.to(weight.dtype), sum_dy.to(weight.dtype)
        return dx, dw, db, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over (N, C, *) whose training statistics span ``process_group``.

    ``process_group=None`` synchronises over all ranks; without an initialised process group,
    or in eval mode, it is an ordinary BatchNorm. Statistics are FP32 for any input dtype; the
    output keeps the input's dtype.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None) -> None:  # fmt: skip
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects (N, C, *) input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        distributed = dist.is_available() and dist.is_initialized()
        if not self.training or not distributed or dist.get_world_size(self.process_group) == 1:
            return super().forward(x.to(_at_least_fp32(x.dtype))).to(x.dtype)
        momentum = self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        out = _SyncBN.apply(
            x, self.weight, self.bias,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.eps, momentum, self.process_group,
        )  # fmt: skip
        return out.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, group_size: int | None = None) -> nn.Module:
    """Replace every BatchNorm in ``module`` by :class:`SyncBatchNorm` (in place; returned).

    ``group_size``: ranks per statistics group (SEER: 8, one node). None or 0: all ranks; 1:
    local BatchNorm (no communication); G: consecutive groups of G ranks. Every rank must call
    this (creating the groups is collective).
    """
    group = None
    if group_size not in (None, 0):
        if not (dist.is_available() and dist.is_initialized()):
            raise FsdpkitError("SyncBatchNorm groups need an initialised process group")
        world, rank = dist.get_world_size(), dist.get_rank()
        if group_size < 1 or world % group_size:
            raise FsdpkitError(
                f"SyncBatchNorm group size {group_size} must divide the world size {world}"
            )
        for start in range(0, world, group_size):  # every rank creates every group, in order
            g = dist.new_group(list(range(start, start + group_size)))
            if start <= rank < start + group_size:
                group = g
    return _convert(module, group)


def _convert(module: nn.Module, group) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, group)  # fmt: skip
        new = new.to(device=next(module.buffers(), torch.empty(0)).device)
        with torch.no_grad():
            if module.affine:
                new.weight, new.bias = module.weight, module.bias
            if module.track_running_stats:
                new.running_mean, new.running_var = module.running_mean, module.running_var
                new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _convert(child, group))
    return module
