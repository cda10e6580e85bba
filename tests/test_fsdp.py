"""The FSDP2 wrapper: sharded training equals one process; communication is the minimum."""

import pytest
from fsdp_fns import mixed_precision_training, one_step_collectives, sharded_matches_single

from fsdpkit.testing import run_distributed

pytestmark = pytest.mark.dist

PLAN = ((0, 2, True), (2, 4, False), (4, 6, True))


@pytest.mark.parametrize("world_size", [2, 3])
def test_fp32_syncbn_training_equals_one_process(world_size):
    for losses, ref_losses, err, comm, units in run_distributed(
        sharded_matches_single, world_size, PLAN
    ):
        for a, b in zip(losses, ref_losses, strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), (losses, ref_losses)
        assert err < 1e-5, err
        for fwd, bwd in comm:
            assert fwd["all_gather"] == units  # one all-gather per sharded unit
            assert bwd["reduce_scatter"] == units  # one reduce-scatter per unit


def test_recomputation_adds_no_all_gather_and_bf16_halves_unit_bytes():
    plain = run_distributed(one_step_collectives, 2, ((0, 6, False),), "fp32")[0]
    planned = run_distributed(one_step_collectives, 2, PLAN, "fp32")[0]
    bf16 = run_distributed(one_step_collectives, 2, PLAN, "bf16")[0]
    assert len(planned[0]) == len(plain[0]) and len(planned[1]) == len(plain[1])
    ratios = [b / a for a, b in zip(planned[0], bf16[0], strict=True)]
    # trunk units gather in BF16 (half); BatchNorm, head and prototypes stay FP32
    assert sorted(set(ratios)) == [0.5, 1.0] and ratios.count(0.5) == 6


def test_bf16_and_fp16_track_fp32():
    fp32 = run_distributed(mixed_precision_training, 2, "fp32")[0][0]
    for dtype in ("bf16", "fp16"):
        losses, taken = run_distributed(mixed_precision_training, 2, dtype)[0]
        assert all(taken)
        for a, b in zip(losses, fp32, strict=True):
            assert abs(a - b) <= 0.02 * abs(b) + 1e-3, (dtype, losses, fp32)


def test_an_inf_on_one_rank_makes_every_rank_skip():
    for _, taken in run_distributed(mixed_precision_training, 2, "fp16", 1):
        assert taken == [True, False, True, True]
