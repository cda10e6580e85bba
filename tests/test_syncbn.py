"""SyncBatchNorm on gloo/CPU equals BatchNorm over the concatenated batch of its group."""

import pytest
import torch
from syncbn_fns import KEYS, matches_global_bn
from torch import nn

from fsdpkit import FsdpkitError
from fsdpkit.syncbn import SyncBatchNorm, convert_sync_batchnorm
from fsdpkit.testing import run_distributed

pytestmark = pytest.mark.dist

# float64 throughout: Chan's combination of per-rank moments reorders the sums, which shows at
# ~1e-15 here (FP32: a CPU-dependent ~1e-6); a wrong count or a missing rank is off by > 1e-2.
TOL = 1e-12


@pytest.mark.parametrize("batch_sizes", [[4, 4], [2, 3, 4]])
def test_equals_global_batchnorm(batch_sizes):
    for res in run_distributed(matches_global_bn, len(batch_sizes), batch_sizes):
        assert res["dtype"] == "torch.float64"
        for key in KEYS:
            assert res["err"][key] < TOL, (key, res)


def test_groups_of_two_on_four_ranks_are_independent():
    for res in run_distributed(matches_global_bn, 4, [2, 3, 4, 1], 2):
        for key in ("out", "running_mean", "running_var", "dx"):
            assert res["err"][key] < TOL, (key, res)


def test_fp16_input_gets_fp32_statistics_and_fp16_output():
    # The noise floor, measured in the same run: exact arithmetic on the FP16-rounded input and
    # upstream gradient, with FP16-rounded results. FP32 statistics match it (measured: equal
    # to 1e-9); FP16 statistics, planted on purpose, measured 1.6–5.4× the floor on every key.
    for res in run_distributed(matches_global_bn, 2, [4, 4], None, torch.float16):
        assert res["dtype"] == "torch.float16"
        err, floor = res["err"], res["floor"]
        for key in KEYS:
            assert err[key] <= 1.25 * floor[key] + 1e-6, (key, err, floor)


def test_without_a_process_group_it_is_batchnorm():
    model = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    assert isinstance(model[1], SyncBatchNorm)
    ref = nn.BatchNorm2d(4).double()
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    model[1].double()
    torch.testing.assert_close(model[1](x), ref(x), rtol=TOL, atol=TOL)
    with pytest.raises(FsdpkitError, match="initialised process group"):
        convert_sync_batchnorm(nn.BatchNorm2d(2), group_size=2)
