"""The PyTorch internals in fsdpkit/_torch_private.py still exist and behave as relied on.

A failure here means a torch release changed something fsdpkit reaches into: the message names
it; fsdpkit/_torch_private.py says what relies on it and why no public API does the job.
"""

import copy
import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fsdpkit import CommCounter, apply_ac
from fsdpkit._torch_private import (
    _CKPT_NAME,
    _ENGINE_NAME,
    check_checkpoint_region,
    checkpoint_region,
    queue_end_of_backward,
    time_work_waits,
)
from fsdpkit.fsdp import _average_grads_after_backward
from fsdpkit.testing import run_distributed


def test_checkpoint_generator_has_the_signature_relied_on():
    try:
        head = check_checkpoint_region()
    except RuntimeError as e:
        pytest.fail(f"{_CKPT_NAME} changed: {e}")
    from torch.utils.checkpoint import noop_context_fn

    # preserve_rng_state, context_fn, determinism_check, debug[, early_stop, new defaults]
    assert head[:4] == (True, noop_context_fn, "default", False), (
        f"{_CKPT_NAME}: its options before *args are no longer bound as relied on: {head}"
    )


def _region(x, calls):
    calls.append(len(calls))
    h = x * 2
    return nn.functional.dropout(h.sin(), 0.5, training=True), weakref.ref(h)


def test_checkpoint_region_drops_the_region_and_recomputes_it_once_in_backward():
    """Opened and closed around code it does not call (as apply_ac's hooks do): what the
    region saved is freed, backward recomputes it once with the forward's RNG state (same
    dropout mask), and gradients equal plain autograd's."""
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    _region(x, [])[0].sum().backward()
    want, x.grad = x.grad, None

    calls: list[int] = []
    torch.manual_seed(0)
    gen = checkpoint_region(lambda t: _region(t, calls), x)
    next(gen)  # open
    y, h = _region(x, [])  # the region, run by its caller
    with pytest.raises(StopIteration):
        next(gen)  # close
    msg = f"{_CKPT_NAME} no longer checkpoints a region run between its two steps"
    assert h() is None, msg + ": a tensor saved inside it (sin's input) is still held"
    assert calls == [], msg + ": it called the function in forward"
    torch.manual_seed(1)  # recomputation must not depend on the RNG state at backward
    y.sum().backward()
    assert calls == [0], msg + f": backward recomputed it {len(calls)} times, not once"
    assert torch.equal(x.grad, want), msg + ": gradients differ from plain autograd's"


def test_end_of_backward_callback_runs_once_after_every_gradient_is_accumulated():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    seen: list[tuple] = []
    queued = [False]

    def at_end() -> None:
        seen.append((a.grad is not None, b.grad is not None))

    def on_grad(_p) -> None:  # from the first gradient accumulated, as fsdpkit.fsdp does
        if not queued[0]:
            queued[0] = True
            queue_end_of_backward(at_end)

    for p in (a, b):
        p.register_post_accumulate_grad_hook(on_grad)
    try:
        ((a * 2).sum() + (a * b).exp().sum()).backward()
    except RuntimeError as e:
        pytest.fail(f"{_ENGINE_NAME} changed: {e}")
    assert seen == [(True, True)], (
        f"{_ENGINE_NAME}: a callback queued in backward ran {len(seen)} times, not once after "
        f"every gradient was accumulated ({seen})"
    )


def _waits() -> tuple[bool, int, int, bool, bool, bool]:
    original = dist.Work.wait
    seen: list[float] = []
    nested: list[float] = []
    with time_work_waits(seen.append):
        patched = dist.Work.wait is not original
        t = torch.ones(3)
        dist.all_reduce(t)  # synchronous: the Python wrapper waits in Work.wait
        sync = len(seen)
        with time_work_waits(nested.append):
            dist.all_reduce(t, async_op=True).wait()
        both = len(seen) == sync + 1 and len(nested) == 1
        inner_closed = dist.Work.wait is not original
    with CommCounter() as c:
        dist.all_reduce(t, async_op=True).wait()
    restored = dist.Work.wait is original
    return patched, sync, len(nested), both and inner_closed, restored, c.exposed_s > 0


@pytest.mark.dist
def test_work_wait_is_where_collectives_wait_and_can_be_timed():
    patched, sync, nested, both, restored, exposed = run_distributed(_waits, 2)[0]
    what = "torch.distributed.Work.wait"
    assert patched, f"{what} can no longer be replaced on the class"
    assert sync == 1, f"a synchronous dist.all_reduce waited {sync} times through {what}"
    assert nested == 1 and both, f"nested timers do not both see a {what}"
    assert restored, f"{what} is not the original after the timers close"
    assert exposed, "CommCounter.exposed_s saw no time blocked in collectives"


class _BNNet(nn.Module):
    """BatchNorms used once, twice (one gradient accumulation), not at all in the loss, and
    inside a checkpointed region (run again in backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1, self.bn2, self.unused = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), nn.Conv2d(4, 4, 1)
        )

    def forward(self, x):
        x = self.bn1(self.conv(x))
        self.unused(x)  # its output reaches no loss: no gradient to wait for
        x = self.blocks(x)
        return self.bn2(self.bn2(x).relu())


def _bn_bucket() -> list[bool]:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = _BNNet().double()
    ref = copy.deepcopy(model)
    plan = type("P", (), {"units": ("blocks.0", "blocks.1"), "segments": ((0, 2, True),)})()
    apply_ac(model, plan)
    bns = [model.bn1, model.bn2, model.unused, model.blocks[0][1]]
    _average_grads_after_backward(bns, None)
    results = []
    for step in range(3):
        torch.manual_seed(10 * step + rank)
        x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
        if step == 1:  # gradients taken without accumulation leave nothing pending
            loss = model(x).square().mean()
            torch.autograd.grad(loss, [model.bn1.weight, model.bn2.weight])
        for m in (model, ref):
            m.zero_grad()
        with CommCounter() as c:
            model(x).square().mean().backward()
        ref(x).square().mean().backward()
        results.append(c.counts["all_reduce"] == 1)
        for m, r in zip(bns, [ref.bn1, ref.bn2, ref.unused, ref.blocks[0][1]], strict=True):
            for p, q in zip(m.parameters(), r.parameters(), strict=True):
                if q.grad is None:
                    results.append(p.grad is None)
                    continue
                want = q.grad.clone()
                dist.all_reduce(want)
                results.append(torch.allclose(p.grad, want / world, rtol=1e-12, atol=0))
    return results


@pytest.mark.dist
def test_replicated_batchnorm_bucket_is_averaged_once_after_its_last_gradient():
    """One all-reduce per backward, after every BatchNorm gradient is in ``.grad`` (one used
    twice, one recomputed in backward; none for an unused one), none for autograd.grad."""
    for rank, results in enumerate(run_distributed(_bn_bucket, 2)):
        assert all(results), (rank, results)
