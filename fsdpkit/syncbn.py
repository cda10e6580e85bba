"""SyncBatchNorm on any backend (gloo/CPU as well as NCCL/CUDA), FP32 statistics, subgroups.

``torch.nn.SyncBatchNorm`` refuses CPU tensors. This one trains through one autograd
Function, :class:`BatchNormFn`, when synchronised over more than one rank. The local case
(no process group, a group of one) runs torch's own batch-norm kernel, which takes FP16/BF16
input with FP32 parameters and statistics on CPU and CUDA alike and keeps what
:class:`BatchNormFn` keeps (the input in its dtype, per-channel FP32 vectors) without the
composed CPU path's FP32 temporaries. For an input ``x`` of shape ``(N, C, *)`` in its
training dtype (FP16, BF16, FP32; FP64 for reference runs):

* arithmetic: statistics, normalisation and gradients in ``A = promote_types(x.dtype, FP32)``
  (FP32, or FP64 for FP64 input); upcast copies of ``x`` are temporaries, freed at once;
* output: ``x.dtype``; ``dx``: ``x.dtype``; ``dweight``/``dbias``: the parameters' dtype;
* saved for backward: ``x`` itself (``x.numel() · x.element_size()`` bytes, no FP32 copy),
  the per-channel ``mean`` and ``invstd`` (``2·C`` in ``A``), the weight (a reference to the
  parameter, ``C``) and the per-rank counts (``world`` in ``A``): backward recomputes
  ``x̂ = (x − mean)·invstd`` in ``A``. For FP16/BF16 this is half of what saving an FP32 ``x̂``
  took (measured, one (16, 128, 28, 28) FP16 layer: 3 212 804 bytes instead of 6 425 088);
* communication per layer and step (synchronised only): forward all-gathers each rank's
  per-channel ``(mean, M2, count)`` — ``world·(2C+1)`` elements in ``A`` — and combines them
  exactly (Chan et al.'s parallel variance, no E[x²]−E[x]² cancellation); backward
  all-reduces ``2C`` elements in ``A``: ``(Σ dy, Σ dy·x̂)`` (CPU) or ``(Σ dy, Σ dy·(x−mean))``
  (CUDA, what torch's kernels take). The local path communicates nothing.

On CUDA the per-element work runs in torch's fused kernels (``batch_norm_stats``,
``batch_norm_elemt``, ``batch_norm_backward_reduce``, ``batch_norm_backward_elemt``), which
read FP16/BF16 input and accumulate in FP32 without materialising an upcast copy; on CPU it is
composed of tensor ops. Weight and bias gradients are local sums, as in
``torch.nn.SyncBatchNorm``: data-parallel averaging (FSDP's reduce-scatter, DDP's all-reduce)
makes them global. Eval mode is an ordinary BatchNorm on the running statistics in ``A``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kitcore.errors import FsdpkitError

__all__ = ["BatchNormFn", "SyncBatchNorm", "convert_sync_batchnorm"]


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """FP32 for FP16/BF16/FP32 input; FP64 input keeps FP64 (reference runs)."""
    return torch.promote_types(dtype, torch.float32)


def _shape(x: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)  # broadcast a (C,) vector over (N, C, *)


def _use_fused_kernels(x: torch.Tensor) -> bool:
    """torch's batch-norm kernels exist for CUDA only (the tests substitute fakes on CPU)."""
    return x.is_cuda and x.numel() > 0


def _native_takes(x: torch.Tensor, param: torch.Tensor | None) -> bool:
    """Whether torch's batch-norm kernel runs ``x`` with parameters/statistics like
    ``param`` (same dtype, or FP16/BF16 input with FP32 ones) in at least FP32 arithmetic."""
    pd = x.dtype if param is None else param.dtype
    return pd == _at_least_fp32(x.dtype)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """What the fused kernels accept: contiguous or channels-last contiguous."""
    if t.is_contiguous() or t.dim() not in (4, 5):
        return t.contiguous()
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous()


def _local_moments(x: torch.Tensor, acc: torch.dtype, fused: bool):
    """Per-channel mean and M2 = Σ(x − mean)² of this rank's ``x``, shapes (C,), dtype ``acc``."""
    c, n = x.shape[1], x.numel() // max(x.shape[1], 1)
    if x.numel() == 0:
        zeros = torch.zeros(c, dtype=acc, device=x.device)
        return zeros, zeros.clone()
    if fused:  # one pass; eps = 0 gives invstd = var^-1/2 (0 where var == 0)
        mean, invstd = torch.batch_norm_stats(x, 0.0)
        m2 = torch.where(invstd > 0, n / invstd.square(), torch.zeros_like(invstd))
        return mean.to(acc), m2.to(acc)
    mean = torch.mean(x, _reduce_dims(x), dtype=acc)
    m2 = (x - mean.view(_shape(x))).square_().sum(_reduce_dims(x))  # x − mean: a temporary in acc
    return mean, m2


def _gather_moments(mean_l, m2_l, n_local: int, group, world: int):
    """All-gather ``(mean, M2, count)`` of every rank (one collective of ``world·(2C+1)``
    elements) and combine them exactly: global mean and M2 (C,), per-rank counts (world,)."""
    c = mean_l.numel()
    local = torch.cat([mean_l, m2_l, mean_l.new_tensor([float(n_local)])])  # (2C+1,)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    gathered = torch.stack(parts)  # (world, 2C+1)
    means, m2s, counts = gathered[:, :c], gathered[:, c : 2 * c], gathered[:, 2 * c :]
    n = counts.sum()
    mean = (means * counts).sum(0) / n
    m2 = (m2s + counts * (means - mean).square()).sum(0)
    return mean, m2, counts.reshape(-1)


class BatchNormFn(torch.autograd.Function):
    """Training-mode BatchNorm over (N, C, *) with statistics over ``group`` (``world`` > 1) or
    this process's batch (``world`` = 1: no collective). See the module docstring for dtypes,
    the bytes saved and the communication.

    ``running_mean``/``running_var`` (C,) are updated in place when given: exponential average
    with factor ``momentum`` of the batch mean and the unbiased batch variance.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group, world):
        acc = _at_least_fp32(x.dtype)
        fused = _use_fused_kernels(x)
        if fused:
            x = _dense(x)
        n_local = x.numel() // x.shape[1] if x.shape[1] else 0
        if world == 1 and n_local <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.shape}"
            )
        mean, m2 = _local_moments(x, acc, fused)
        if world > 1:
            mean, m2, counts = _gather_moments(mean, m2, n_local, group, world)
        else:
            counts = mean.new_tensor([float(n_local)])
        n = counts.sum()
        var = m2 / n
        if running_mean is not None and running_var is not None:
            unbiased = var * n / (n - 1).clamp_min(1)
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        invstd = torch.rsqrt(var + eps)
        w = None if weight is None else weight.to(acc)
        b = None if bias is None else bias.to(acc)
        if fused:  # reads x in its dtype, FP32 (acc) parameters and statistics, writes x.dtype
            out = torch.batch_norm_elemt(x, w, b, mean, invstd, eps)
        else:
            y = x - mean.view(_shape(x))  # type promotion: a new tensor in acc
            y.mul_((invstd if w is None else invstd * w).view(_shape(x)))
            if b is not None:
                y.add_(b.view(_shape(x)))
            out = y.to(x.dtype)
        ctx.save_for_backward(x, weight, mean, invstd, counts)
        ctx.group, ctx.world, ctx.fused = group, world, fused
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, counts = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_w, need_b = need_w and weight is not None, need_b and weight is not None
        w = None if weight is None else weight.to(mean.dtype)
        dx = dw = db = None
        if ctx.fused:
            dy = _dense(dy)
            sum_dy, sum_dy_xmu, dw, db = torch.batch_norm_backward_reduce(
                dy, x, mean, invstd, w, need_x, need_w, need_b
            )
            if need_x:
                sum_dy, sum_dy_xmu = _all_reduce_pair(sum_dy, sum_dy_xmu, ctx)
                dx = torch.batch_norm_backward_elemt(
                    dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, counts.to(torch.int32)
                )
        else:
            s, dims = _shape(x), _reduce_dims(x)
            x_hat = (x - mean.view(s)).mul_(invstd.view(s))  # recomputed, a temporary in acc
            sum_dy = dy.sum(dims, dtype=mean.dtype)
            sum_dy_xhat = (x_hat * dy).sum(dims)
            dw, db = sum_dy_xhat, sum_dy  # local sums
            if need_x:
                g_dy, g_dy_xhat = _all_reduce_pair(sum_dy, sum_dy_xhat, ctx)
                n = counts.sum()
                scale = invstd if w is None else invstd * w
                dx = x_hat.mul_((-g_dy_xhat / n).view(s)).add_(dy).sub_((g_dy / n).view(s))
                dx = dx.mul_(scale.view(s)).to(x.dtype)
        dw = dw.to(weight.dtype) if need_w else None
        db = db.to(weight.dtype) if need_b else None
        return dx, dw, db, None, None, None, None, None, None


def _all_reduce_pair(a: torch.Tensor, b: torch.Tensor, ctx):
    """Σ over the group of two (C,) vectors in one all-reduce (2C elements); the inputs are
    left as they are (they are also the local weight and bias gradients)."""
    if ctx.world == 1:
        return a, b
    sums = torch.cat([a, b])
    dist.all_reduce(sums, group=ctx.group)
    return sums[: a.numel()], sums[a.numel() :]


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over (N, C, *) whose training statistics span ``process_group``.

    ``process_group=None`` synchronises over all ranks; without an initialised process group,
    or with a group of one, training is local (no communication) through torch's own kernel
    (see the module docstring). Eval mode is an ordinary BatchNorm in FP32 (FP64 for FP64
    input).
    Statistics are FP32 for any input dtype; the output keeps the input's dtype; backward
    keeps the input, not an FP32 copy of it.
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
        if not self.training:
            return super().forward(x.to(_at_least_fp32(x.dtype))).to(x.dtype)
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size(self.process_group) if distributed else 1
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        if world == 1 and _native_takes(x, self.weight if self.affine else running_mean):
            return F.batch_norm(
                x, running_mean, running_var, self.weight, self.bias, True, momentum, self.eps
            )
        return BatchNormFn.apply(
            x, self.weight, self.bias, running_mean, running_var, self.eps, momentum,
            self.process_group if world > 1 else None, world,
        )  # fmt: skip


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
        # Created on the module's device rather than moved there: Module.to() swaps tensor
        # subclasses (FakeTensor under the planner's FSDPMemTracker) and refuses to.
        device = next(iter([*module.parameters(), *module.buffers()]), torch.empty(0)).device
        with torch.device(device):
            new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, group)  # fmt: skip
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
