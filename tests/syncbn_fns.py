"""Per-rank bodies for the SyncBatchNorm tests: every rank builds the same global batch."""

import torch
import torch.distributed as dist
from torch import nn

from fsdpkit.syncbn import SyncBatchNorm, convert_sync_batchnorm

KEYS = ("out", "running_mean", "running_var", "dx", "dw")


def _global(batch_sizes, channels=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (sum(batch_sizes), channels, 5, 4)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1
    r = torch.randn(shape, generator=gen, dtype=torch.float64)  # upstream gradient: Σ out·r
    return x, r


def _slice(batch_sizes, rank):
    start = sum(batch_sizes[:rank])
    return slice(start, start + batch_sizes[rank])


def _reference(x, r, weight, bias, dtype):
    """float64 BatchNorm on the group's rows; with ``dtype`` below float64, on the input and
    the upstream gradient rounded to it, output and input gradient rounded to it too: exact
    arithmetic on what a ``dtype`` layer is given and must return (its noise floor)."""
    ref = nn.BatchNorm2d(x.shape[1]).double()
    with torch.no_grad():
        ref.weight.copy_(weight)
        ref.bias.copy_(bias)
    xr = x.to(dtype).double().requires_grad_()
    out = ref(xr)
    (out * r.to(dtype).double()).sum().backward()
    stats = {"running_mean": ref.running_mean, "running_var": ref.running_var}
    dw = torch.cat([ref.weight.grad, ref.bias.grad])
    return out.detach().to(dtype).double(), xr.grad.to(dtype).double(), dw, stats


def matches_global_bn(batch_sizes, group_size=None, dtype=torch.float64):
    """SyncBN on this rank's slice vs float64 BatchNorm on its group's concatenated batch.

    Returns the max abs error of each of :data:`KEYS` against the exact (float64) answer, and,
    for ``dtype`` below float64, the same errors of the noise-floor reference (see
    :func:`_reference`)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = group_size or world
    group_ranks = list(range(rank // g * g, rank // g * g + g))
    x, r = _global(batch_sizes)
    model = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), group_size)
    bn = model[0].to(torch.float64 if dtype == torch.float64 else torch.float32)
    assert isinstance(bn, SyncBatchNorm)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
        bn.bias.copy_(torch.tensor([0.1, 0.0, 0.3]))
    mine = _slice(batch_sizes, rank)
    xl = x[mine].to(dtype).requires_grad_()
    out = bn(xl)
    (out.double() * r[mine]).sum().backward()
    dw = torch.cat([bn.weight.grad, bn.bias.grad]).double()
    dist.all_reduce(dw)  # data parallelism would average; the sum is the global gradient
    rows = torch.cat([torch.arange(sum(batch_sizes))[_slice(batch_sizes, q)] for q in group_ranks])
    before = group_ranks[: group_ranks.index(rank)]
    own = slice(sum(batch_sizes[q] for q in before),
                sum(batch_sizes[q] for q in before) + batch_sizes[rank])  # fmt: skip
    groups = world // g  # the summed weight gradient adds every group's

    def errors(ref_out, ref_dx, ref_dw, stats, got_out, got_dx, got_dw, got_stats) -> dict:
        return {
            "out": (got_out - ref_out[own]).abs().max().item(),
            "dx": (got_dx - ref_dx[own]).abs().max().item(),
            "dw": (got_dw - ref_dw * groups).abs().max().item() if g == world else 0.0,
            **{k: (got_stats[k].double() - stats[k]).abs().max().item() for k in stats},
        }

    weight, bias = bn.weight.detach().double(), bn.bias.detach().double()
    exact = _reference(x[rows], r[rows], weight, bias, torch.float64)
    got = (out.detach().double(), xl.grad.double(), dw,
           {"running_mean": bn.running_mean, "running_var": bn.running_var})  # fmt: skip
    result = {"dtype": str(out.dtype), "err": errors(*exact, *got)}
    if dtype != torch.float64:
        floor = _reference(x[rows], r[rows], weight, bias, dtype)
        f_out, f_dx, f_dw, f_stats = floor
        result["floor"] = errors(*exact, f_out[own], f_dx[own], f_dw * groups, f_stats)
    return result
