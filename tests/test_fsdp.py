"""The FSDP2 wrapper: sharded training equals one process; communication is the minimum."""

import pytest
from fsdp_fns import (
    mixed_precision_training,
    one_step_collectives,
    replicated_bn_grads_after_meta_init,
    sharded_matches_single,
    sharded_state_bytes,
    vit_profile_plan_train,
)

from fsdpkit import FsdpkitError, FSDPPolicy, get_model_spec, parallelize
from fsdpkit.fsdp import _CAN_IGNORE
from fsdpkit.testing import run_distributed

PLAN = ((0, 2, True), (2, 4, False), (4, 6, True))


@pytest.mark.dist
@pytest.mark.parametrize(
    ("world_size", "batchnorm"), [(2, "units"), (3, "units"), (3, "replicate")]
)
def test_fp32_syncbn_training_equals_one_process(world_size, batchnorm):
    for losses, ref_losses, err, comm, units in run_distributed(
        sharded_matches_single, world_size, PLAN, 5, {"batchnorm": batchnorm}
    ):
        for a, b in zip(losses, ref_losses, strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), (losses, ref_losses)
        assert err < 1e-5, err
        for fwd, bwd in comm:
            assert fwd["all_gather"] == units  # one all-gather per sharded unit
            assert bwd["reduce_scatter"] == units  # one reduce-scatter per unit
            if batchnorm == "replicate":  # all BatchNorm gradients in one bucket
                assert bwd["bn_all_reduce"] == 1


@pytest.mark.dist
def test_recomputation_adds_no_all_gather_and_bf16_halves_unit_bytes():
    plain = run_distributed(one_step_collectives, 2, ((0, 6, False),), "fp32")[0]
    planned = run_distributed(one_step_collectives, 2, PLAN, "fp32")[0]
    bf16 = run_distributed(one_step_collectives, 2, PLAN, "bf16")[0]
    assert len(planned[0]) == len(plain[0]) and len(planned[1]) == len(plain[1])
    ratios = [b / a for a, b in zip(planned[0], bf16[0], strict=True)]
    # trunk units gather in BF16 (half); BatchNorm, head and prototypes stay FP32
    assert sorted(set(ratios)) == [0.5, 1.0] and ratios.count(0.5) == 6


@pytest.mark.dist
def test_bf16_and_fp16_track_fp32():
    fp32 = run_distributed(mixed_precision_training, 2, "fp32")[0][0]
    for dtype in ("bf16", "fp16"):
        losses, taken = run_distributed(mixed_precision_training, 2, dtype)[0]
        assert all(taken)
        for a, b in zip(losses, fp32, strict=True):
            assert abs(a - b) <= 0.02 * abs(b) + 1e-3, (dtype, losses, fp32)


@pytest.mark.dist
def test_an_inf_on_one_rank_makes_every_rank_skip():
    for _, taken in run_distributed(mixed_precision_training, 2, "fp16", 1):
        assert taken == [True, False, True, True]


@pytest.mark.dist
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_state_is_a_share_of_the_full_model(world_size):
    for used, full, pad, whole in run_distributed(sharded_state_bytes, world_size):
        for nbytes in used:  # parameters, gradients, momentum
            # a 1/N share (+ dim-0 padding) of what is sharded, all of what is replicated
            bound = (full - whole) / world_size + pad + whole
            assert nbytes <= bound, (nbytes, full / world_size, pad, whole)
            assert whole < 0.01 * full  # only BatchNorm is replicated


@pytest.mark.dist
def test_a_non_regnet_model_goes_through_profile_plan_parallelize():
    for losses, err, segments in run_distributed(vit_profile_plan_train, 2):
        assert any(c for _, _, c in segments)  # the plan checkpoints something
        for got, want in losses:
            assert abs(got - want) <= 1e-5 * abs(want)
        assert err < 1e-5


def test_plan_mismatch_and_missing_units_are_clear_errors():
    spec = get_model_spec("toy_models:vit_spec")
    model = spec.build_model("meta")

    class WrongPlan:
        units = ("trunk.units.0",)
        segments = ((0, 1, True),)

    with pytest.raises(FsdpkitError, match="plan does not match the model"):
        parallelize(model, plan=WrongPlan, policy=FSDPPolicy(sync_bn_group_size=-1))
    with pytest.raises(FsdpkitError, match="needs a plan or the model's units"):
        parallelize(model)
    with pytest.raises(FsdpkitError, match="param_dtype"):
        FSDPPolicy(param_dtype="fp8")
    with pytest.raises(FsdpkitError, match="GradScaler"):
        FSDPPolicy(param_dtype="fp16", batchnorm="replicate")


@pytest.mark.dist
@pytest.mark.skipif(not _CAN_IGNORE, reason="replicated BatchNorm needs torch >= 2.7")
def test_replicated_batchnorm_grads_are_averaged_after_meta_init_and_to_empty():
    # to_empty gives BatchNorm new parameter objects after sharding; hooks must follow them
    assert run_distributed(replicated_bn_grads_after_meta_init, 2) == [True, True]
