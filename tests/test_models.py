"""RegNetY + SwAV modules: meta builds, analytic costs vs FlopCounterMode, init, multi-crop."""

import itertools
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from seer_train.models import PRESETS, build_swav_model, multicrop_input, resolution_groups

SMALL = ["tiny", "rg8gf", "rg16gf"]


def _flops(module, x):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list(PRESETS))
def test_builds_on_meta_without_storage(name):
    model = build_swav_model(PRESETS[name], "meta")
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.is_meta for t in tensors)


@pytest.mark.parametrize("name", list(PRESETS))
def test_unit_params_match_analytic(name):
    trunk = build_swav_model(PRESETS[name], "meta").trunk
    for unit, cost in zip(trunk.units, trunk.unit_costs((224, 224)), strict=True):
        assert sum(p.numel() for p in unit.parameters()) == cost.params


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("hw", [(224, 224), (160, 160), (97, 61)])
def test_unit_flops_match_flop_counter(name, hw):
    trunk = build_swav_model(PRESETS[name], "meta").trunk
    x = torch.empty(2, 3, *hw, device="meta")
    for i, (unit, cost) in enumerate(zip(trunk.units, trunk.unit_costs(hw), strict=True)):
        assert _flops(unit, x) == 2 * cost.flops, f"unit {i}"  # batch of 2 images
        x = unit(x)
        assert tuple(x.shape[-2:]) == cost.out_hw


def test_whole_model_flops_are_trunk_plus_heads_per_crop():
    preset = PRESETS["rg8gf"]
    model = build_swav_model(preset, "meta")
    counted = _flops(model, multicrop_input(preset.crop_sizes, 1, torch.device("meta")))
    trunk = sum(sum(c.flops for c in preset.regnet.unit_costs(s)) for s in preset.crop_sizes)
    dims = [*preset.head_dims, preset.num_prototypes]
    head = sum(2 * a * b for a, b in itertools.pairwise(dims))
    assert counted == trunk + len(preset.crop_sizes) * head


def test_init_follows_pycls():
    torch.manual_seed(0)
    model = build_swav_model(PRESETS["rg8gf"], "cpu")
    conv = model.trunk.units[-1].c  # 896 → 2016, 1×1
    assert math.isclose(conv.weight.std().item(), math.sqrt(2.0 / 2016), rel_tol=0.02)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
            assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)
            assert m.num_batches_tracked.item() == 0
        elif isinstance(m, torch.nn.Linear):  # PyTorch's default, as VISSL's SwAV head
            bound = 1 / math.sqrt(m.in_features)
            assert abs(m.weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound
            assert m.weight.abs().max() <= bound
        elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
            assert torch.all(m.bias == 0)


def test_build_is_deterministic_under_seed():
    preset = PRESETS["tiny"]
    torch.manual_seed(1)
    a = build_swav_model(preset).state_dict()
    torch.manual_seed(1)
    b = build_swav_model(preset).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_forward_shapes_and_normalisation():
    preset = PRESETS["tiny"]
    model = build_swav_model(preset)
    crops = multicrop_input(preset.crop_sizes, 3, torch.device("cpu"))
    z, scores = model(crops)
    assert z.shape == (6 * 3, 32) and scores.shape == (6 * 3, 64)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(18))


def test_resolution_groups_are_consecutive_runs():
    crops = [torch.empty(1, 3, s, s) for s in (160, 160, 96, 96, 96, 96)]
    assert resolution_groups(crops) == [(0, 2), (2, 6)]
    crops = [torch.empty(1, 3, s, s) for s in (32, 64, 32)]
    assert resolution_groups(crops) == [(0, 1), (1, 2), (2, 3)]


def test_multicrop_equals_per_crop_passes_in_eval_mode():
    preset = PRESETS["tiny"]
    # float64: batched and single-crop convolutions may take other kernels (other summation
    # orders); float64 keeps that at round-off on every CPU
    model = build_swav_model(preset).eval().double()
    crops = [c.double() for c in multicrop_input(preset.crop_sizes, 2, torch.device("cpu"))]
    z, _scores = model(crops)
    z_each = torch.cat([model(c)[0] for c in crops])
    torch.testing.assert_close(z, z_each, rtol=1e-12, atol=1e-12)


def test_one_call_per_unit_equals_separate_group_passes_in_train_mode():
    # BatchNorm normalises each resolution group alone, exactly as separate trunk passes would.
    preset = PRESETS["tiny"]
    model = build_swav_model(preset).double()
    calls = [0]
    model.trunk.units[2].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    crops = [c.double() for c in multicrop_input(preset.crop_sizes, 2, torch.device("cpu"))]
    feats = model.trunk([torch.cat(crops[:2]), torch.cat(crops[2:])])
    assert calls[0] == 1
    separate = torch.cat([model.trunk(torch.cat(crops[:2])), model.trunk(torch.cat(crops[2:]))])
    torch.testing.assert_close(feats, separate, rtol=1e-12, atol=1e-12)


def test_tiny_trains_on_cpu():
    torch.manual_seed(0)
    preset = PRESETS["tiny"]
    model = build_swav_model(preset)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    crops = multicrop_input(preset.crop_sizes, 8, torch.device("cpu"))
    target = torch.arange(6 * 8) % 64  # fit fixed pseudo-labels: the loss must fall
    losses = []
    for _ in range(25):
        _, scores = model(crops)
        loss = torch.nn.functional.cross_entropy(scores / 0.1, target)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
