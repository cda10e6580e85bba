"""LARC reference (written plainly from the formula) and the per-rank test bodies."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fsdpkit import LARC, CommCounter

LR, MOMENTUM, WD, ETA = 0.5, 0.9, 1e-2, 0.02


class Net(nn.Module):
    """Conv + BN + Linear(4 → 2): with 3 ranks, fc's 2 rows leave one rank an empty shard.

    float64, as the batches are: sharded norms are sums in another order than the reference's,
    which FP32 shows at a CPU-dependent ~1e-7 and float64 at ~1e-16."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def reference_step(params, grads, bufs, *, clip, exclude_1d, eps=1e-8):
    """One LARC + SGD(momentum) step on full tensors, parameter by parameter."""
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if exclude_1d and p.ndim <= 1:
            d = g
        else:
            w_norm, g_norm = p.norm().item(), g.norm().item()
            if w_norm > 0 and g_norm > 0:
                rate = ETA * w_norm / (g_norm + WD * w_norm + eps)
                if clip:
                    rate = min(rate / LR, 1.0)
            else:
                rate = 1.0
            d = (g + WD * p) * rate
        bufs[i] = d.clone() if bufs[i] is None else MOMENTUM * bufs[i] + d
        p -= LR * bufs[i]


def batches(steps: int):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(6, 3, 8, 8, generator=gen, dtype=torch.float64) for _ in range(steps)]


def run_reference(model, steps, *, clip, exclude_1d):
    params = [p for p in model.parameters()]
    bufs = [None] * len(params)
    for x in batches(steps):
        model.zero_grad()
        model(x).square().mean().backward()
        with torch.no_grad():
            reference_step(params, [p.grad for p in params], bufs, clip=clip, exclude_1d=exclude_1d)
    return [p.detach().clone() for p in params]


def make_larc(model, *, clip, exclude_1d):
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    return LARC(sgd, trust_coefficient=ETA, clip=clip, exclude_1d=exclude_1d)


def run_larc(model, opt, steps):
    """Train; returns the collectives counted inside every optimizer step."""
    comm = []
    for x in batches(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        with CommCounter() as c:
            opt.step()
        comm.append(dict(c.counts) | {f"{k}_numel": v for k, v in c.numel.items()})
    return comm


def max_rel_error(got, want):
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
               for a, b in zip(got, want, strict=True))  # fmt: skip


def fsdp_all_modes(modes, steps: int = 10):
    """Every rank, every (clip, exclude_1d) mode: see :func:`fsdp_matches_reference`."""
    return [fsdp_matches_reference(clip, exclude_1d, steps) for clip, exclude_1d in modes]


def fsdp_matches_reference(clip: bool, exclude_1d: bool, steps: int = 10):
    """Every rank: FSDP2-sharded LARC vs the single-process reference on the same data."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    for m in (model.conv, model.bn, model.fc):
        fully_shard(m)
    fully_shard(model)
    opt = make_larc(model, clip=clip, exclude_1d=exclude_1d)
    comm = run_larc(model, opt, steps)
    got = [p.full_tensor() for p in model.parameters()]
    want = run_reference(ref, steps, clip=clip, exclude_1d=exclude_1d)
    adapted = sum(1 for p in ref.parameters() if not (exclude_1d and p.ndim <= 1))
    empty = sum(p.to_local().numel() == 0 for p in model.parameters())
    return max_rel_error(got, want), comm, adapted, empty


def ddp_matches_reference(steps: int = 5):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    ddp = DDP(model)
    opt = make_larc(ddp, clip=False, exclude_1d=False)
    comm = run_larc(ddp, opt, steps)
    want = run_reference(ref, steps, clip=False, exclude_1d=False)
    # DDP averages identical gradients, so the reference sees the same ones.
    return max_rel_error(list(model.parameters()), want), comm
