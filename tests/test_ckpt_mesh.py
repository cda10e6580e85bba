"""Checkpoints follow each tensor's own mesh: HSDP (replicate × shard), sub-meshes, refusals."""

import json

import pytest
import torch
from mesh_fns import (
    build,
    hsdp_save_and_load,
    load_slices,
    refused,
    same,
    state,
    submesh_save_and_load,
)
from safetensors import safe_open

from ckpt import load_sliced, reslice, verify
from fsdpkit.testing import run_distributed


def _written(path):
    """Per rank file, the tensor names in it."""
    out = {}
    for f in sorted(path.glob("rank_*.safetensors")):
        with safe_open(f, "pt") as st:
            out[f.name] = set(st.keys())
    return out


@pytest.mark.dist
def test_hsdp_saves_one_copy_loads_bitwise_and_reslices_to_any_layout(tmp_path):
    src, dst = tmp_path / "sharded", tmp_path / "sliced"
    results = run_distributed(hsdp_save_and_load, 4, src)
    full = results[0][0]
    for rank, (_, local_diff, flat_diff, step_diff) in enumerate(results):
        assert local_diff == [], (rank, local_diff)  # (a) the same HSDP layout
        assert flat_diff == [], (rank, flat_diff)  # 1-D FSDP over the same 4 ranks
        assert step_diff == [], (rank, step_diff)  # and training goes on identically
    # who wrote what: mesh [[0, 1], [2, 3]]; replica group 0 (ranks 0, 1) wrote the rows once,
    # ranks 2 and 3 only their RNG state
    verify(src)
    manifest = json.loads((src / "manifest.json").read_text())
    for name, t in manifest["tensors"].items():
        ranks = [sh["rank"] for sh in t["shards"]]
        if t["sharded"]:
            assert ranks == [0, 1], (name, ranks)
        elif not name.startswith("rng/"):
            assert ranks == [0], (name, ranks)
    files = _written(src)
    assert files["rank_00002.safetensors"] == {"rng/2"}
    assert files["rank_00003.safetensors"] == {"rng/3"}
    # (b) slices load on other layouts, bitwise equal to the gathered full tensors
    reslice(src, dst, with_optimizer=True, workers=2)
    info = json.loads((dst / "manifest.json").read_text())
    assert info["units"] == ["layers.0", "layers.1", "layers.2", "layers.3", "scale"]
    model, opt = build(seed=4)  # one process, whole
    load_sliced(dst, model, opt)
    assert same(state(model, opt), full) == []
    for on_two in run_distributed(load_slices, 2, dst, "fsdp"):
        assert same(on_two, full) == []
    for on_hsdp in run_distributed(load_slices, 4, dst, "hsdp"):
        assert same(on_hsdp, full) == []


@pytest.mark.dist
def test_copies_on_separate_sub_meshes_are_recorded_once(tmp_path):
    results = run_distributed(submesh_save_and_load, 4, tmp_path / "s")
    assert all(diff == [] for diff, _ in results), [diff for diff, _ in results]
    full = results[0][1]
    assert all(same(r[1], full) == [] for r in results)  # both groups held the same values
    verify(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    for name, t in manifest["tensors"].items():
        if t["sharded"]:  # group 0 (ranks 0, 1) recorded; group 1's equal rows left aside
            assert [sh["rank"] for sh in t["shards"]] == [0, 1], name
    reslice(tmp_path / "s", tmp_path / "d", with_optimizer=True)
    model, opt = build(seed=4)
    load_sliced(tmp_path / "d", model, opt)
    assert same(state(model, opt), full) == []


@pytest.mark.dist
@pytest.mark.parametrize(
    ("kind", "named"),
    [
        ("shard1", "Shard(dim=1)"),
        ("two_shards", "Shard(dim=0), Shard(dim=0)"),
        ("partial", "Partial("),
    ],
)
def test_unsupported_placements_are_refused_in_one_line(tmp_path, kind, named):
    for message in run_distributed(refused, 2, tmp_path / "s", kind):
        assert message is not None and "\n" not in message, message
        assert "tensor param/weight: placements (" in message and named in message, message
        assert "not supported" in message
    assert not (tmp_path / "s").exists()


def test_plain_tensors_still_save_as_before(tmp_path):
    """No process group: one file, every tensor whole, as a 1-D world of one."""
    from ckpt import load_sharded, save_sharded

    model, opt = build()
    model(torch.ones(2, 6, dtype=torch.float64)).sum().backward()
    opt.step()
    save_sharded(tmp_path / "s", model, opt, step=1)
    fresh, fresh_opt = build(seed=1)
    load_sharded(tmp_path / "s", fresh, fresh_opt)
    assert same(state(model, opt), state(fresh, fresh_opt)) == []
