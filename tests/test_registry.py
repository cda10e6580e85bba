"""Model registry: entry-point discovery, package.module:factory, and spec validation."""

from importlib.metadata import EntryPoint

import pytest
import torch

import kitcore.registry
from fsdpkit import (
    ModelNotFoundError,
    ModelSpec,
    ModelSpecError,
    available_models,
    get_model_spec,
    summarize_model,
)

PRESET_NAMES = {"regnet10b", "rg256gf", "rg128gf", "rg64gf", "rg32gf", "rg16gf", "rg8gf", "tiny"}


def test_seer_presets_are_registered_through_entry_points():
    assert set(available_models()) >= PRESET_NAMES
    for name in PRESET_NAMES:
        assert get_model_spec(name).name == name


def test_units_are_stem_then_blocks():
    spec = get_model_spec("tiny")
    model = spec.build_model("meta")
    names = [n for n, _ in spec.named_units(model)]
    assert names == [f"trunk.units.{i}" for i in range(6)]
    assert [i.kind for i in model.trunk.unit_info] == ["stem"] + ["block"] * 5
    assert [i.stage for i in model.trunk.unit_info] == [0, 1, 2, 3, 3, 3]


def test_example_input_is_the_seer_crop_set():
    crops = get_model_spec("regnet10b").example_input(16, torch.device("meta"))
    assert [tuple(c.shape) for c in crops] == [(16, 3, 160, 160)] * 2 + [(16, 3, 96, 96)] * 4


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelNotFoundError) as e:
        get_model_spec("resnet50")
    msg = str(e.value)
    assert "'resnet50'" in msg and "regnet10b" in msg and "tiny" in msg and "\n" not in msg


def test_user_model_by_module_path_goes_through_the_generic_summary():
    spec = get_model_spec("toy_models:vit_spec")
    assert spec.name == "toy-vit"
    model = spec.build_model("meta")
    assert [n for n, _ in spec.named_units(model)] == ["embed", "blocks.0", "blocks.1", "blocks.2"]
    summary = summarize_model(spec)
    assert set(summary.parameters) == {"embed", "blocks", "classifier", "total"}
    assert summary.parameters["total"] == sum(p.numel() for p in model.parameters())
    assert summary.flops_per_sample > 0


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("toy_models:not_a_spec", ModelSpecError),
        ("toy_models:no_such_factory", ModelNotFoundError),
        ("no_such_package.models:spec", ModelNotFoundError),
        ("toy_models:", ModelNotFoundError),
    ],
)
def test_bad_module_paths(path, error):
    with pytest.raises(error, match=r"expected|cannot import|has no"):
        get_model_spec(path)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        ("empty_units_spec", "no units"),
        ("foreign_unit_spec", "not a submodule"),
        ("repeated_unit_spec", "appears twice"),
    ],
)
def test_invalid_unit_chains(factory, match):
    spec = get_model_spec(f"toy_models:{factory}")
    with pytest.raises(ModelSpecError, match=match):
        spec.named_units(spec.build_model("meta"))


def test_spec_is_frozen_and_validated():
    spec = get_model_spec("tiny")
    with pytest.raises(AttributeError):
        spec.name = "other"
    with pytest.raises(TypeError):
        spec.info["crops"] = "none"
    with pytest.raises(ModelSpecError, match="callable"):
        ModelSpec(name="x", build=1, example_input=print, units=list)
    with pytest.raises(ModelSpecError, match="non-empty"):
        ModelSpec(name="", build=print, example_input=print, units=list)


def _fake_entry_points(monkeypatch, *pairs):
    eps = [EntryPoint(name=n, value=v, group=kitcore.registry.ENTRY_POINT_GROUP) for n, v in pairs]
    monkeypatch.setattr(kitcore.registry, "entry_points", lambda group: eps)


def test_entry_point_problems_are_reported_not_hidden(monkeypatch):
    _fake_entry_points(
        monkeypatch,
        ("toy-vit", "toy_models:vit_spec"),
        ("renamed", "toy_models:vit_spec"),
        ("broken", "no_such_module:spec"),
        ("twice", "toy_models:vit_spec"),
        ("twice", "toy_models:empty_units_spec"),
    )
    assert available_models() == ["broken", "renamed", "toy-vit", "twice"]
    assert get_model_spec("toy-vit").name == "toy-vit"
    with pytest.raises(ModelSpecError, match="named 'toy-vit'"):
        get_model_spec("renamed")
    with pytest.raises(ModelSpecError, match="loading entry point no_such_module:spec failed"):
        get_model_spec("broken")
    with pytest.raises(ModelSpecError, match="more than once"):
        get_model_spec("twice")
