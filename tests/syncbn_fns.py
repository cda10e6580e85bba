"""Per-rank bodies for the SyncBatchNorm tests: every rank builds the same global batch."""

import torch
import torch.distributed as dist
from torch import nn

from fsdpkit.syncbn import SyncBatchNorm, convert_sync_batchnorm


def _global(batch_sizes, channels=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(batch_sizes), channels, 5, 4, generator=gen) * 3 + 1
    r = torch.randn(x.shape, generator=gen)  # fixed upstream gradient: loss = Σ out·r
    return x, r


def _slice(batch_sizes, rank):
    start = sum(batch_sizes[:rank])
    return slice(start, start + batch_sizes[rank])


def matches_global_bn(batch_sizes, group_size=None, dtype=torch.float32):
    """SyncBN on this rank's slice vs nn.BatchNorm2d on its group's concatenated batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = group_size or world
    group_ranks = range(rank // g * g, rank // g * g + g)
    x, r = _global(batch_sizes)
    model = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), group_size)
    bn = model[0]
    assert isinstance(bn, SyncBatchNorm)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
        bn.bias.copy_(torch.tensor([0.1, 0.0, 0.3]))
    xl = x[_slice(batch_sizes, rank)].to(dtype).requires_grad_()
    out = bn(xl)
    (out.float() * r[_slice(batch_sizes, rank)]).sum().backward()
    dw = torch.cat([bn.weight.grad, bn.bias.grad])
    dist.all_reduce(dw)  # data parallelism would average; the sum is the global gradient
    # reference on the group's rows only
    rows = torch.cat([torch.arange(sum(batch_sizes))[_slice(batch_sizes, q)] for q in group_ranks])
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.copy_(bn.weight)
        ref.bias.copy_(bn.bias)
    xr = x[rows].clone().requires_grad_()
    ref_out = ref(xr)
    (ref_out * r[rows]).sum().backward()
    mine = [q for q in group_ranks].index(rank)
    own = slice(sum(batch_sizes[q] for q in list(group_ranks)[:mine]),
                sum(batch_sizes[q] for q in list(group_ranks)[: mine + 1]))  # fmt: skip
    ref_dw = torch.cat([ref.weight.grad, ref.bias.grad]) * (world // g)  # summed over groups
    return {
        "dtype": str(out.dtype),
        "out": (out.float() - ref_out.detach()[own]).abs().max().item(),
        "running_mean": (bn.running_mean - ref.running_mean).abs().max().item(),
        "running_var": (bn.running_var - ref.running_var).abs().max().item(),
        "dx": (xl.grad.float() - xr.grad[own]).abs().max().item(),
        "dw": (dw - ref_dw).abs().max().item() if g == world else 0.0,
    }
