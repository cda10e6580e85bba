"""SyncBatchNorm on gloo/CPU equals BatchNorm over the concatenated batch of its group."""

import pytest
import torch
from syncbn_fns import matches_global_bn
from torch import nn

from fsdpkit import FsdpkitError
from fsdpkit.syncbn import SyncBatchNorm, convert_sync_batchnorm
from fsdpkit.testing import run_distributed

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("batch_sizes", [[4, 4], [2, 3, 4]])
def test_equals_global_batchnorm(batch_sizes):
    for res in run_distributed(matches_global_bn, len(batch_sizes), batch_sizes):
        assert res["dtype"] == "torch.float32"
        for key in ("out", "running_mean", "running_var", "dx", "dw"):
            assert res[key] < 1e-5, (key, res)


def test_groups_of_two_on_four_ranks_are_independent():
    for res in run_distributed(matches_global_bn, 4, [2, 3, 4, 1], 2):
        for key in ("out", "running_mean", "running_var", "dx"):
            assert res[key] < 1e-5, (key, res)


def test_fp16_input_gets_fp32_statistics_and_fp16_output():
    for res in run_distributed(matches_global_bn, 2, [4, 4], None, torch.float16):
        assert res["dtype"] == "torch.float16"
        assert res["out"] < 2e-2 and res["running_mean"] < 1e-2 and res["dx"] < 2e-2


def test_without_a_process_group_it_is_batchnorm():
    model = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    assert isinstance(model[1], SyncBatchNorm)
    ref = nn.BatchNorm2d(4)
    x = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(model[1](x), ref(x))
    with pytest.raises(FsdpkitError, match="initialised process group"):
        convert_sync_batchnorm(nn.BatchNorm2d(2), group_size=2)
