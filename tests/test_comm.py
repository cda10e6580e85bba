"""CommCounter sees c10d collectives and DTensor's functional ones, with payload bytes."""

import pytest
from dist_fns import count_collectives

from fsdpkit.testing import run_distributed


@pytest.mark.dist
def test_counts_and_bytes_by_kind():
    counts, nbytes = run_distributed(count_collectives, 2)[0]
    assert counts == {"all_reduce": 1, "all_gather": 2, "reduce_scatter": 1}
    assert nbytes["all_reduce"] == 5 * 4
    assert nbytes["all_gather"] == 10 * 4 + 4 * 4 * 4  # dist (10 floats) + padded 4×4 weight
    assert nbytes["reduce_scatter"] == 10 * 4
