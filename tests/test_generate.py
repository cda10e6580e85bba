"""RegNetY generation (SPEC §2): properties, SEER presets, and counts checked by hand."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from seer_train.models import PRESETS, RegNetConfig, adjust_widths_groups, quantize_widths

configs = st.builds(
    lambda d, w0, w_a, w_m, gw: RegNetConfig(depth=d, w_0=8 * w0, w_a=w_a, w_m=w_m, group_width=gw),
    d=st.integers(1, 40),
    w0=st.integers(1, 300),
    w_a=st.floats(0.0, 1000.0),
    w_m=st.floats(1.05, 4.0),
    gw=st.integers(1, 1200),
)


@given(configs)
def test_quantized_widths_are_multiples_of_q(cfg):
    ws = quantize_widths(cfg.w_a, cfg.w_0, cfg.w_m, cfg.depth, cfg.q)
    assert len(ws) == cfg.depth
    assert all(w > 0 and w % 8 == 0 for w in ws)
    assert ws == sorted(ws)  # widths never shrink with depth


@given(configs)
def test_stages_are_compatible_with_groups_and_sum_to_depth(cfg):
    stages = cfg.stages()
    assert sum(s.depth for s in stages) == cfg.depth
    for s in stages:
        assert 1 <= s.group_width <= cfg.group_width
        assert s.width % s.group_width == 0
        assert s.groups * s.group_width == s.width


@given(st.lists(st.integers(1, 5000), min_size=1, max_size=6), st.integers(1, 2000))
def test_adjust_widths_groups_moves_each_width_by_at_most_half_a_group(ws, gw):
    adjusted, gws = adjust_widths_groups(ws, gw)
    for w, a, g in zip(ws, adjusted, gws, strict=True):
        assert g == min(gw, w)
        assert a % g == 0
        assert abs(a - w) <= g / 2


@pytest.mark.parametrize(
    ("name", "widths", "depths", "group_width"),
    [
        # SPEC §2: Table 16 / VISSL config (the paper's text has the depths permuted).
        ("regnet10b", [2020, 4040, 11110, 28280], [2, 7, 17, 1], 1010),
        ("rg256gf", [746, 1492, 4103, 10444], [2, 7, 17, 1], 373),
        # SPEC §2: the 2021 paper's "RegNetY-256GF (528, 1056, 2904, 7392)" is this config.
        ("rg128gf", [528, 1056, 2904, 7392], [2, 7, 17, 1], 264),
        ("rg8gf", [168, 448, 896, 2016], [2, 4, 10, 1], 56),
    ],
)
def test_seer_presets_generate_published_stages(name, widths, depths, group_width):
    stages = PRESETS[name].regnet.stages()
    assert [s.width for s in stages] == widths
    assert [s.depth for s in stages] == depths
    assert {s.group_width for s in stages} == {group_width}


@pytest.mark.parametrize("name", list(PRESETS))
def test_head_input_is_last_stage_width(name):
    p = PRESETS[name]
    assert p.head_dims[0] == p.regnet.stages()[-1].width


def hand_trunk_params(cfg: RegNetConfig) -> int:
    """Parameters written out from widths, depths and group widths, block by block."""
    stem = cfg.stem_width
    total = 3 * 3 * 3 * stem + 2 * stem  # conv + BN
    w_in = stem
    for stage in cfg.stages():
        w, g = stage.width, stage.group_width
        for i in range(stage.depth):
            w_se = round(0.25 * w_in)
            total += w_in * w + 2 * w  # 1×1 a + BN
            total += (w // g) * g * g * 9 + 2 * w  # 3×3 with w/g groups of g → g
            total += w * w_se + w_se + w_se * w + w  # SE convs with bias
            total += w * w + 2 * w  # 1×1 c + BN
            if i == 0:  # stride 2: projection shortcut
                total += w_in * w + 2 * w
            w_in = w
    return total


@pytest.mark.parametrize("name", list(PRESETS))
def test_analytic_params_match_hand_calculation(name):
    cfg = PRESETS[name].regnet
    assert sum(c.params for c in cfg.unit_costs(224)) == hand_trunk_params(cfg)


def test_tiny_params_worked_example():
    # stem 928; blocks 4448 (32→24, proj), 9078 (24→48, proj), 28524 (48→96, proj),
    # 30648, 30648 (96→96): see hand_trunk_params for the terms.
    assert hand_trunk_params(PRESETS["tiny"].regnet) == 104_274


@pytest.mark.parametrize(
    ("name", "gmacs", "params_m"),
    # pycls model zoo, RegNetY-8.0GF / 16GF / 32GF: GF in multiply-adds; params include a
    # 1000-class fc (w_last * 1000 + 1000), removed here.
    [("rg8gf", 8.0, 39.2 - 2.017), ("rg16gf", 15.9, 83.6 - 3.025), ("rg32gf", 32.3, 145.0 - 3.713)],
)
def test_presets_match_pycls_model_zoo(name, gmacs, params_m):
    costs = PRESETS[name].regnet.unit_costs(224)
    assert math.isclose(sum(c.flops for c in costs) / 2e9, gmacs, rel_tol=0.01)
    assert math.isclose(sum(c.params for c in costs) / 1e6, params_m, rel_tol=0.005)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"depth": 0},
        {"w_0": 12},  # not a multiple of q = 8
        {"w_a": -1.0},
        {"w_m": 1.0},
        {"group_width": 0},
    ],
)
def test_invalid_config_is_rejected(kwargs):
    base = {"depth": 4, "w_0": 24, "w_a": 24.0, "w_m": 2.0, "group_width": 8}
    with pytest.raises(ValueError):
        RegNetConfig(**(base | kwargs))
