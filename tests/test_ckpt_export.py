"""Hugging Face out: exports load bitwise in transformers', accelerate's and huggingface_hub's
own loaders, into our RegNetY and a ViT; optimizer state stays out; bad input writes nothing."""

import argparse
import json

import pytest
import torch
from accelerate import load_checkpoint_in_model
from ckpt_fns import train_and_save
from huggingface_hub.serialization import load_torch_model
from toy_models import vit_spec

import ckpt.export
from ckpt import CheckpointError, reslice, save_sharded
from ckpt._cli_formats import add_format_commands
from ckpt._format import read_header
from ckpt.export import HF_INDEX, export_hf
from fsdpkit import get_model_spec
from fsdpkit.testing import run_distributed
from kitcore.console import run_command

try:  # transformers 5 moved it out of modeling_utils
    from transformers.trainer_utils import load_sharded_checkpoint
except ImportError:
    from transformers.modeling_utils import load_sharded_checkpoint

SPECS = {"tiny": lambda: get_model_spec("tiny"), "vit": vit_spec}


def _fresh(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return SPECS[name]().build_model("cpu")


def _sliced(tmp, name: str) -> tuple[dict[str, torch.Tensor], object]:
    """A sliced checkpoint with optimizer state and BatchNorm statistics that are not their
    defaults; (the saved state dict, the path)."""
    model = _fresh(name, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    spec = SPECS[name]()
    x = spec.example_input(2, torch.device("cpu"))
    out = model(x)
    loss = sum(o.float().square().mean() for o in out) if isinstance(out, tuple) else out.sum()
    loss.backward()
    opt.step()
    save_sharded(tmp / "sharded", model, opt, step=1)
    reslice(tmp / "sharded", tmp / "sliced", with_optimizer=True)
    return {k: v.clone() for k, v in model.state_dict().items()}, tmp / "sliced"


@pytest.fixture(scope="module", params=["tiny", "vit"])
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    saved, sliced = _sliced(tmp, request.param)
    info = export_hf(sliced, tmp / "hf", max_shard_bytes=64 * 1024)  # several files
    return request.param, saved, tmp / "hf", info


def _bitwise(model, saved):
    state = model.state_dict()
    assert state.keys() == saved.keys()
    for k, v in saved.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


@pytest.mark.parametrize("loader", ["transformers", "accelerate", "huggingface_hub"])
def test_hf_export_loads_bitwise_in_the_real_loaders(exported, loader):
    name, saved, path, _ = exported
    model = _fresh(name, 1)
    assert not torch.equal(next(iter(model.parameters())), next(iter(saved.values())))
    if loader == "transformers":
        load_sharded_checkpoint(model, path, strict=True)
    elif loader == "accelerate":
        load_checkpoint_in_model(model, path, strict=True)
    else:
        load_torch_model(model, path, strict=True)
    _bitwise(model, saved)


def test_hf_export_layout(exported):
    _, saved, path, info = exported
    index = json.loads((path / HF_INDEX).read_text())
    assert set(index["weight_map"]) == set(saved)  # plain names, no optimizer state
    files = sorted(path.glob("*.safetensors"))
    assert len(files) > 2 and len(files) == len(info["files"])
    assert info["left_out"]["optim"] > 0
    total = 0
    for f in files:
        start, header = read_header(f)
        assert header.pop("__metadata__") == {"format": "pt"}
        assert all(index["weight_map"][n] == f.name for n in header)
        total += f.stat().st_size - start
    assert index["metadata"]["total_size"] == total == sum(v.nbytes for v in saved.values())


def test_bf16_single_file_converts_floats_only_in_small_chunks(tmp_path, monkeypatch):
    saved, sliced = _sliced(tmp_path, "tiny")
    monkeypatch.setattr(ckpt.export, "_CHUNK", 4096)  # many chunks per tensor
    info = export_hf(sliced, tmp_path / "hf", format="single", dtype="bf16")
    assert (
        list(info["files"]) == ["model.safetensors"] and not (tmp_path / "hf" / HF_INDEX).exists()
    )
    _, header = read_header(tmp_path / "hf" / "model.safetensors")
    dtypes = {n: h["dtype"] for n, h in header.items() if n != "__metadata__"}
    assert dtypes["trunk.units.0.bn.num_batches_tracked"] == "I64"
    assert {d for n, d in dtypes.items() if "num_batches" not in n} == {"BF16"}
    want = {k: v.to(torch.bfloat16).to(v.dtype) if v.is_floating_point() else v
            for k, v in saved.items()}  # fmt: skip
    for load in (load_torch_model, load_checkpoint_in_model):
        model = _fresh("tiny", 1)
        load(model, tmp_path / "hf", strict=True)
        _bitwise(model, want)


@pytest.mark.dist
def test_sharded_two_ranks_export_directly(tmp_path):
    saved = run_distributed(train_and_save, 2, tmp_path / "sharded")[0]
    export_hf(tmp_path / "sharded", tmp_path / "hf", format="single")
    model = _fresh("tiny", 1)
    load_torch_model(model, tmp_path / "hf", strict=True)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), saved, strict=True))


def test_corrupt_source_or_existing_dst_writes_nothing(tmp_path):
    _, sliced = _sliced(tmp_path, "vit")
    tensors = json.loads((sliced / "manifest.json").read_text())["tensors"]
    meta = tensors["param/blocks.1.mlp.0.weight"]
    victim = sliced / meta["file"]
    data = bytearray(victim.read_bytes())
    data[sum(meta["offsets"]) // 2] ^= 0x01  # inside that tensor
    victim.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=rf"{victim.name}: tensor blocks\.1\.mlp\.0\.weight: checksum"
    ):
        export_hf(sliced, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not (tmp_path / ".hf.partial").exists()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep").write_text("mine")
    with pytest.raises(CheckpointError, match="exists; outputs are never overwritten"):
        export_hf(sliced, tmp_path / "hf")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep"]
    with pytest.raises(CheckpointError, match="unknown dtype 'int8'"):
        export_hf(sliced, tmp_path / "other", dtype="int8")


def _cli(argv):
    parser = argparse.ArgumentParser(prog="ckpt")
    add_format_commands(parser.add_subparsers(dest="command", required=True))
    return run_command("ckpt", parser, argv)


def test_cli_export_json_table_and_error(tmp_path, capsys):
    _, sliced = _sliced(tmp_path, "vit")
    assert _cli(["export", str(sliced), str(tmp_path / "a"), "--json", "--dtype", "fp16"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "fp16" and info["format"] == "hf" and info["tensors"] > 0
    assert _cli(["export", str(sliced), str(tmp_path / "b"), "--format", "single"]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    assert _cli(["export", str(tmp_path / "nothing"), str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ckpt: error: ") and err.count("\n") == 1
