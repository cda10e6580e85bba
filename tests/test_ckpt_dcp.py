"""DCP in: a ``torch.distributed.checkpoint.save`` directory from FSDP2 verified, inspected and
resliced without a process group; slices load on other world sizes; corruption DCP misses is
caught; a malicious ``.metadata`` is refused without running."""

import json
import os
import pickle
import shutil

import pytest
import torch
from dcp_fns import load_slices, snapshot, train_and_save_dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from ckpt import CheckpointError, inspect, load_sliced, read_dcp_manifest, reslice, verify
from ckpt.cli import main
from fsdpkit import get_model_spec
from fsdpkit.testing import run_distributed

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DCP checkpoint saved by FSDP2 on 2 gloo ranks, and the full tensors it holds."""
    path = tmp_path_factory.mktemp("dcp") / "step_2"
    model_sd, optim_state = run_distributed(train_and_save_dcp, 2, path)[0]
    return path, model_sd, optim_state


@pytest.fixture
def copy(saved, tmp_path):
    dst = tmp_path / "dcp"
    shutil.copytree(saved[0], dst)
    return dst


def _equal(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def _shard(path, name, rank=None):
    """(file, data byte range) of a chunk of tensor ``name`` (in rank ``rank``'s file)."""
    shards = read_dcp_manifest(path)["tensors"][name]["shards"]
    s = next(s for s in shards if rank is None or s["rank"] == rank)
    return path / s["file"], s["offsets"]


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_reslice_loads_bitwise_on_one_and_three_ranks(saved, tmp_path, capsys):
    path, model_sd, optim_state = saved
    manifest = verify(path)
    kinds = {t["kind"] for t in manifest["tensors"].values()}
    assert kinds == {"param", "buffer", "optim"} and manifest["world_size"] == 2
    # replicated tensors (BatchNorm statistics, AdamW's step) are stored once, in some file
    steps = [t for n, t in manifest["tensors"].items() if n.endswith("/step")]
    assert steps and all(len(t["shards"]) == 1 for t in steps)
    code, out, _ = _cli(capsys, "reslice", path, tmp_path / "sliced", "--with-optimizer", "--json")
    assert code == 0 and json.loads(out)["tensors"] == len(manifest["tensors"])
    sliced = verify(tmp_path / "sliced")  # every output CRC-32 (combined from chunks') holds
    assert sliced["source_world_size"] == 2
    # one process, unsharded
    spec = get_model_spec("tiny")
    torch.manual_seed(1)
    model = spec.build_model("cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    load_sliced(tmp_path / "sliced", model, opt)
    got_sd, got_state = snapshot(model, opt)
    _equal(got_sd, model_sd)
    _equal(got_state, optim_state)
    assert opt.param_groups[0]["weight_decay"] == 0.05
    # three ranks, FSDP2
    for got_sd, got_state in run_distributed(load_slices, 3, tmp_path / "sliced"):
        _equal(got_sd, model_sd)
        _equal(got_state, optim_state)


def test_inspect_and_cli(saved, capsys):
    path, model_sd, _ = saved
    info = inspect(path)
    assert info["kind"] == "dcp" and info["world_size"] == 2 and info["step"] is None
    nbytes = sum(t.numel() * t.element_size() for t in model_sd.values())
    assert info["kinds"]["param"]["bytes"] + info["kinds"]["buffer"]["bytes"] == nbytes
    code, out, _ = _cli(capsys, "inspect", path)
    assert code == 0 and "dcp, world size 2" in out
    code, out, _ = _cli(capsys, "verify", path, "--json")
    assert code == 0 and json.loads(out)["ok"]


def test_flipped_byte_dcp_loads_silently_verify_catches(saved, copy, tmp_path, capsys):
    name = "param/trunk.units.0.conv.weight"
    f, (begin, end) = _shard(copy, name)
    with open(f, "r+b") as fh:
        fh.seek((begin + end) // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0x10]))
    dcp_to_torch_save(copy, tmp_path / "dcp.pt")  # DCP itself: no error, a changed weight
    loaded = torch.load(tmp_path / "dcp.pt", weights_only=True)["model"]
    key = name.removeprefix("param/")
    assert not torch.equal(loaded[key], saved[1][key])
    with pytest.raises(CheckpointError, match=rf"{f.name}: tensor {name}: checksum mismatch"):
        verify(copy)
    dst = tmp_path / "sliced"
    code, _, err = _cli(capsys, "reslice", copy, dst)
    assert code == 2 and err.count("\n") == 1 and f"{f.name}: tensor {name}: checksum" in err
    assert not dst.exists()


def test_truncated_and_missing_files(copy, tmp_path, capsys):
    f = copy / "__1_0.distcp"
    os.truncate(f, f.stat().st_size - 100)
    code, _, err = _cli(capsys, "verify", copy)
    assert code == 2 and err.count("\n") == 1
    assert "__1_0.distcp: truncated" in err and "tensor " in err
    code, _, err = _cli(capsys, "reslice", copy, tmp_path / "sliced")
    assert code == 2 and "truncated" in err and not (tmp_path / "sliced").exists()
    (copy / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: missing \(holds (tensor )?\S+"):
        verify(copy)


class _Evil:
    """Unpickling this calls os.system (what a raw ``pickle.load`` would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_metadata_is_refused_without_running(copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    meta = copy / ".metadata"
    with open(meta, "rb") as fh:
        md = pickle.load(fh)  # our own file, written above: trusted here
    md.planner_data["model.trunk.units.0.conv.weight"] = _Evil(marker)  # hidden inside
    meta.write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match=r"\.metadata: refuses to unpickle posix\.system"):
        verify(copy)
    meta.write_bytes(pickle.dumps(_Evil(marker)))  # the whole file
    code, _, err = _cli(capsys, "reslice", copy, tmp_path / "sliced")
    assert code == 2 and err.count("\n") == 1 and "refuses to unpickle" in err
    assert not marker.exists() and not (tmp_path / "sliced").exists()


def test_optimizer_saved_by_position_is_named_in_the_error(copy, tmp_path):
    meta = copy / ".metadata"
    with open(meta, "rb") as fh:
        md = pickle.load(fh)
    # as if saved from optimizer.state_dict(): state keyed by position
    md.planner_data = {k: tuple(0 if c == "trunk.units.0.conv.weight" else c for c in p)
                       for k, p in md.planner_data.items()}  # fmt: skip
    meta.write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match="keyed by position"):
        reslice(copy, tmp_path / "sliced", with_optimizer=True)
    reslice(copy, tmp_path / "sliced")  # the model alone still converts
    assert not [n for n in read_dcp_manifest(copy)["tensors"] if n.startswith("optim/")]
