"""SwAV loss, distributed Sinkhorn, the SEER LR schedule, multi-crop cost (SPEC §3)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from swav_fns import one_step_all_gathers, sinkhorn_on_my_rows
from torch.utils.flop_counter import FlopCounterMode

from fsdpkit.testing import run_distributed
from seer_train.loss import SwAVLossConfig, sinkhorn, swav_loss
from seer_train.models import PRESETS, RegNetTrunk
from seer_train.schedule import SEERSchedule


def reference_swav_loss(z, prototypes, n_crops, eps=0.03, temp=0.1, iters=10):
    """The SwAV paper's loop, one crop at a time, float64, no max shift (float64 has room)."""
    z, prototypes = z.double(), prototypes.double()
    scores = z @ prototypes.t()
    b = scores.shape[0] // n_crops
    total = 0.0
    for i in (0, 1):
        out = scores[i * b : (i + 1) * b]
        q = torch.exp(out / eps).t()  # K x B
        q /= q.sum()
        k = q.shape[0]
        for _ in range(iters):
            q /= q.sum(dim=1, keepdim=True)
            q /= k
            q /= q.sum(dim=0, keepdim=True)
            q /= b
        q = (q * b).t()
        sub = 0.0
        for p in range(n_crops):
            if p != i:
                logp = F.log_softmax(scores[p * b : (p + 1) * b] / temp, dim=1)
                sub -= torch.mean(torch.sum(q * logp, dim=1))
        total += sub / (n_crops - 1)
    return total / 2


@pytest.mark.parametrize("n_crops,b,k", [(6, 8, 16), (2, 5, 7), (4, 16, 64)])
def test_loss_matches_the_plain_reference(n_crops, b, k):
    g = torch.Generator().manual_seed(n_crops * b)
    z = F.normalize(torch.randn(n_crops * b, 12, generator=g), dim=1)
    protos = F.normalize(torch.randn(k, 12, generator=g), dim=1)
    ours = swav_loss(z @ protos.t(), n_crops)
    assert ours.item() == pytest.approx(reference_swav_loss(z, protos, n_crops).item(), rel=1e-5)


def test_codes_are_targets_and_extreme_scores_stay_finite():
    scores = (torch.randn(12, 5, generator=torch.Generator().manual_seed(5)) * 50).requires_grad_()
    loss = swav_loss(scores, 6)  # exp((s - max) / ε) underflows whole rows and columns here
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()
    # gradient only through the softmax: codes of crops 0 and 1 are constants
    probe = scores.detach().clone().requires_grad_()
    with torch.no_grad():
        codes = sinkhorn(torch.stack(probe.chunk(6)[:2]))
    logp = F.log_softmax(probe.chunk(6)[2] / 0.1, dim=1)
    (-(codes[0] * logp).sum(dim=1).mean()).backward()
    assert probe.grad[:2].abs().sum() == 0 and probe.grad[4:6].abs().sum() > 0


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 20), k=st.integers(2, 40), d=st.integers(2, 16))
def test_sinkhorn_codes_are_distributions_with_equal_prototype_mass(b, k, d):
    g = torch.Generator().manual_seed(b * 100 + k * 10 + d)
    z = F.normalize(torch.randn(2, b, d, generator=g), dim=2)
    scores = z @ F.normalize(torch.randn(k, d, generator=g), dim=1).t()  # cosines, as in SwAV
    # 1,000 iterations: at ε 0.03, low-dimensional cosines (d = 2) converge slowly; 200 left
    # (b, k, d) = (16, 5, 2) 0.2 off an equal partition. Checked over the whole domain.
    q = sinkhorn(scores, iters=1000)
    assert torch.isfinite(q).all() and (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=2), torch.ones(2, b), rtol=0, atol=1e-4)
    if b >= k:  # an equal partition is reachable: each prototype gets b / k images
        torch.testing.assert_close(q.sum(dim=1), torch.full((2, k), b / k), rtol=1e-2, atol=1e-2)


@pytest.mark.dist
@pytest.mark.parametrize("splits", [[4, 4], [3, 6]])
def test_distributed_sinkhorn_equals_one_process_on_the_whole_batch(splits):
    # float64: the all-reduced sums add rows in another order than one process does, which
    # FP32 shows at a CPU-dependent ~1e-6; float64 at ~1e-15. A missing rank is off by > 1e-2.
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, sum(splits), 10, generator=g, dtype=torch.float64)
    parts = run_distributed(sinkhorn_on_my_rows, len(splits), scores, splits)
    whole = sinkhorn(scores)
    assert whole.dtype == torch.float64
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-12, atol=1e-14)


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        SwAVLossConfig(temperature=0)
    with pytest.raises(ValueError, match="split"):
        swav_loss(torch.randn(7, 3), 6)


def test_seer_learning_rate_at_start_end_of_warmup_and_last_iteration():
    lr = SEERSchedule(batch_size=7936, total_iters=126_000)
    assert lr.peak_lr == pytest.approx(9.3)
    assert lr(0) == pytest.approx(0.15)
    # iteration 5,500 is just past warmup (5,499.6): cosine on global progress t = 5500/126000
    t = 5500 / 126_000
    assert lr(5500) == pytest.approx(0.0093 + 0.5 * (9.3 - 0.0093) * (1 + math.cos(math.pi * t)))
    assert 9.25 < lr(5500) < 9.26  # the small step down from 9.3 at the end of warmup
    assert lr(5499) == pytest.approx(0.15 + (9.3 - 0.15) * 5499 / 126_000 / 0.043648)
    assert lr(125_999) == pytest.approx(0.0093, abs=1e-6)


def test_multicrop_trunk_flops_are_below_60_percent_of_padding_to_160():
    trunk = RegNetTrunk(PRESETS["rg8gf"].regnet).to("meta")
    big = torch.empty(2, 3, 160, 160, device="meta")
    small = torch.empty(4, 3, 96, 96, device="meta")
    with FlopCounterMode(display=False) as ours:
        trunk([big, small])  # SwAV reference: one group per resolution
    with FlopCounterMode(display=False) as vissl:
        trunk(torch.empty(6, 3, 160, 160, device="meta"))  # VISSL: 96 px crops zero-padded
    ratio = ours.get_total_flops() / vissl.get_total_flops()
    assert ratio <= 0.6, ratio
    assert ratio == pytest.approx((2 * 160**2 + 4 * 96**2) / (6 * 160**2), rel=0.02)


@pytest.mark.dist
def test_multicrop_step_all_gathers_like_one_pass():
    multi, single = run_distributed(one_step_all_gathers, 2, (64, 64, 32, 32, 32, 32))[0], None
    single = run_distributed(one_step_all_gathers, 2, (64,) * 6)[0]
    assert multi == single > 0


def test_public_api_loads_lazily():
    import subprocess
    import sys

    code = (
        "import sys, seer_train.models; assert 'kornia' not in sys.modules; "
        "import seer_train; f = seer_train.pretrain; assert 'kornia' in sys.modules; "
        "assert all(hasattr(seer_train, n) for n in seer_train.__all__)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
