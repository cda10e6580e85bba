"""Sharded → sliced: one file per unit, streamed and resumable; slices load on any world size."""

import json
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ckpt_fns import (
    continue_from_sharded,
    continue_from_slices,
    load_slices,
    save_after,
    train_and_save,
)
from kill_fns import kill_at_nth_call

import ckpt.sliced
from ckpt import CheckpointError, load_sliced, reslice, save_sharded, unit_of
from ckpt._format import crc32_of_range, write_safetensors
from fsdpkit import get_model_spec
from fsdpkit.testing import run_distributed


def test_unit_of_uses_recorded_units_then_numbered_modules():
    units = ["trunk.units.3", "head"]
    assert unit_of("param/trunk.units.3.a.weight", units) == "trunk.units.3"
    assert unit_of("optim/head.mlp.0.bias/momentum_buffer", units) == "head"
    assert unit_of("param/prototypes.weight", units) == "prototypes"
    assert unit_of("param/blocks.2.attn.in_proj_weight") == "blocks.2"


@pytest.mark.dist
def test_slices_from_two_ranks_load_bitwise_on_one_two_three(tmp_path):
    src, dst = tmp_path / "sharded", tmp_path / "sliced"
    saved = run_distributed(train_and_save, 2, src)[0]
    reslice(src, dst, workers=2)
    info = json.loads((dst / "manifest.json").read_text())
    assert info["units"] == [f"trunk.units.{i}" for i in range(6)] + ["head", "prototypes"]
    assert len(info["files"]) == 8 and info["source_world_size"] == 2
    # one process, unsharded
    model = get_model_spec("tiny").build_model("cpu")
    load_sliced(dst, model)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), saved, strict=True))
    total = sum(f["bytes"] for f in info["files"].values())
    for world in (2, 3):
        for params, nbytes in run_distributed(load_slices, world, dst):
            assert all(torch.equal(a, b) for a, b in zip(params, saved, strict=True))
            # each rank reads ~1/M of the bytes (replicated BatchNorm is read whole)
            assert nbytes <= total / world + 64 * 1024, (world, nbytes, total)


def test_interrupted_reslice_leaves_nothing_complete_and_rerun_finishes(tmp_path):
    model, opt = _trained_tiny()
    src, dst = tmp_path / "sharded", tmp_path / "sliced"
    save_sharded(src, model, opt, step=1)

    def crash_after_three(unit, i, total):
        if i == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reslice(src, dst, with_optimizer=True, on_unit=crash_after_three)
    assert not dst.exists() and (tmp_path / ".sliced.partial").is_dir()
    with pytest.raises(CheckpointError, match="not a complete sliced checkpoint"):
        load_sliced(tmp_path / ".sliced.partial", model)
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / ".sliced.partial").glob("unit_*")}
    reslice(src, dst, with_optimizer=True)
    kept = {p.name: p.stat().st_mtime_ns for p in dst.glob("unit_*") if p.name in first}
    assert kept == first  # finished units were not written again
    fresh = get_model_spec("tiny").build_model("cpu")
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    load_sliced(dst, fresh, opt2)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
    )
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["momentum_buffer"], s2[k]["momentum_buffer"]) for k in s1)


def test_cli_reslice(tmp_path):
    model = get_model_spec("tiny").build_model("cpu")
    save_sharded(tmp_path / "sharded", model, step=3)
    script = Path(sys.executable).parent / "ckpt"
    args = [script, "reslice", str(tmp_path / "sharded"), str(tmp_path / "sliced"), "--json"]
    out = subprocess.run(args, capture_output=True, text=True)
    # no units recorded: 6 trunk units, the 3 numbered head layers, prototypes
    assert out.returncode == 0 and json.loads(out.stdout)["units"] == 10
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 2 and "never overwritten" in again.stderr
    missing = subprocess.run([script, "reslice", str(tmp_path / "nope"), str(tmp_path / "x")],
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1


def test_verify_and_inspect_read_sliced_checkpoints(tmp_path):
    model = get_model_spec("tiny").build_model("cpu")
    save_sharded(tmp_path / "sharded", model, step=3)
    reslice(tmp_path / "sharded", tmp_path / "sliced")
    script = Path(sys.executable).parent / "ckpt"

    def ckpt(*args):
        return subprocess.run([script, *map(str, args)], capture_output=True, text=True)

    ok = ckpt("verify", tmp_path / "sliced", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"]
    info = json.loads(ckpt("inspect", tmp_path / "sliced", "--json").stdout)
    assert (info["kind"], info["step"], info["world_size"], info["units"]) == ("sliced", 3, 1, 10)
    manifest = json.loads((tmp_path / "sliced" / "manifest.json").read_text())
    name, meta = next((n, t) for n, t in manifest["tensors"].items() if t["kind"] == "param")
    f = tmp_path / "sliced" / meta["file"]
    data = bytearray(f.read_bytes())
    data[meta["offsets"][0]] ^= 0xFF
    f.write_bytes(bytes(data))
    bad = ckpt("verify", tmp_path / "sliced")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert str(f) in bad.stderr and name in bad.stderr and "checksum" in bad.stderr


@pytest.mark.dist
def test_training_resumes_on_three_ranks_from_a_two_rank_checkpoint(tmp_path):
    src, dst = tmp_path / "sharded", tmp_path / "sliced"
    run_distributed(save_after, 2, src, 2)
    reslice(src, dst, with_optimizer=True)
    on_two = run_distributed(continue_from_sharded, 2, src, 2, 3)[0]
    on_three = run_distributed(continue_from_slices, 3, dst, 2, 3)[0]
    for a, b in zip(on_three, on_two, strict=True):  # float64: 3 ranks sum in another order
        assert abs(a - b) <= 1e-10 * abs(b), (on_three, on_two)


def test_a_non_regnet_model_saves_reslices_and_loads(tmp_path):
    spec = get_model_spec("toy_models:vit_spec")
    torch.manual_seed(0)
    model = spec.build_model("cpu")
    units = [n for n, _ in spec.named_units(model)] + ["classifier"]
    save_sharded(tmp_path / "s", model, step=1, units=units)
    reslice(tmp_path / "s", tmp_path / "d")
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["units"] == units
    fresh = spec.build_model("cpu")
    load_sliced(tmp_path / "d", fresh)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
    )


def _trained_tiny():
    torch.manual_seed(0)
    model = get_model_spec("tiny").build_model("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return model, opt


def _checksums_match_the_bytes(dst):
    info = json.loads((dst / "manifest.json").read_text())
    for name, t in info["tensors"].items():
        assert crc32_of_range(dst / t["file"], *t["offsets"]) == t["crc32"], name
    return info


def test_reslice_writes_exactly_what_write_safetensors_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.sliced, "_CHUNK", 4096)  # tensors span many chunks
    model, opt = _trained_tiny()
    save_sharded(tmp_path / "sharded", model, opt, step=1)
    reslice(tmp_path / "sharded", tmp_path / "sliced", with_optimizer=True, workers=3)
    info = _checksums_match_the_bytes(tmp_path / "sliced")
    full = {f"param/{n}": p for n, p in model.named_parameters()}
    full |= {f"buffer/{n}": b for n, b in model.named_buffers()}
    for n, p in model.named_parameters():
        full |= {f"optim/{n}/{k}": v for k, v in opt.state[p].items()}
    for fname, f in info["files"].items():
        names = [n for n, t in info["tensors"].items() if t["file"] == fname]
        index = write_safetensors(tmp_path / "expected", [(n, full[n]) for n in names])
        assert (tmp_path / "sliced" / fname).read_bytes() == (tmp_path / "expected").read_bytes()
        for n in names:  # and the manifest records what write_safetensors returns
            where = {"unit": f["unit"], "file": fname, "kind": n.split("/")[0]}
            assert info["tensors"][n] == index[n] | where, n


@pytest.mark.dist
def test_uneven_and_empty_shards_from_three_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.sliced, "_CHUNK", 1000)  # chunks that split rows
    src, dst = tmp_path / "sharded", tmp_path / "sliced"
    saved = run_distributed(train_and_save, 3, src)[0]
    shards = [
        t["shards"] for t in json.loads((src / "manifest.json").read_text())["tensors"].values()
    ]
    assert any(len({s["rows"] for s in sh}) > 1 for sh in shards)  # uneven rows: the case at hand
    reslice(src, dst, with_optimizer=True)
    _checksums_match_the_bytes(dst)
    model = get_model_spec("tiny").build_model("cpu")
    load_sliced(dst, model)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), saved, strict=True))


def test_corrupt_truncated_or_untiled_shards_stop_reslice_and_rerun_finishes(tmp_path):
    model, opt = _trained_tiny()
    src, dst = tmp_path / "sharded", tmp_path / "sliced"
    save_sharded(src, model, opt, step=1)
    manifest = json.loads((src / "manifest.json").read_text())
    params = [n for n, t in manifest["tensors"].items() if t["kind"] == "param"]
    name = max(params, key=lambda n: math.prod(manifest["tensors"][n]["shape"]))
    meta = manifest["tensors"][name]
    shard = src / meta["shards"][0]["file"]
    good = shard.read_bytes()
    begin, end = meta["shards"][0]["offsets"]
    at = (begin + end) // 2
    shard.write_bytes(good[:at] + bytes([good[at] ^ 1]) + good[at + 1 :])
    with pytest.raises(CheckpointError, match=f"tensor {re.escape(name)}: checksum mismatch"):
        reslice(src, dst, with_optimizer=True)
    assert not dst.exists()
    shard.write_bytes(good[:at])
    with pytest.raises(CheckpointError, match=f"tensor {re.escape(name)}: truncated"):
        reslice(src, dst, with_optimizer=True)
    shard.write_bytes(good)
    meta["shards"][0]["row_offset"] = 1
    (src / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CheckpointError, match=f"tensor {re.escape(name)}: its shards do not tile its rows"
    ):
        reslice(src, dst, with_optimizer=True)
    meta["shards"][0]["row_offset"] = 0
    (src / "manifest.json").write_text(json.dumps(manifest))
    assert not dst.exists()
    reslice(src, dst, with_optimizer=True)
    fresh = get_model_spec("tiny").build_model("cpu")
    load_sliced(dst, fresh)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
    )


_IO_CALLS = ("pwrite", "fsync", "rename", "unlink")  # every durable step reslice takes


def _reslicer(src, dst, kill_at, counts):
    """Reslice in this (forked) process; SIGKILL itself just before its ``kill_at``-th I/O call
    (``None``: never; the number of calls made is put on ``counts``). Kill points are counted
    in I/O calls, not seconds, so where they land does not depend on the machine's speed."""
    ckpt.sliced._CHUNK = 1024  # many small writes: kills land anywhere in a unit's bytes
    made = kill_at_nth_call([(os, name) for name in _IO_CALLS], kill_at)
    reslice(src, dst, with_optimizer=True)
    counts.put(made())


def test_sigkill_during_reslice_never_leaves_complete_looking_bad_slices(tmp_path):
    model, opt = _trained_tiny()
    src, dst = tmp_path / "sharded", tmp_path / "sliced"
    save_sharded(src, model, opt, step=1)
    ctx = mp.get_context("fork")
    counts = ctx.Queue()
    proc = ctx.Process(target=_reslicer, args=(src, tmp_path / "counted", None, counts))
    proc.start()
    total = counts.get(timeout=300)  # a hang guard; the reslice takes well under a second
    proc.join()
    assert proc.exitcode == 0 and total > 100, total

    def check():  # complete-looking slices are complete and exact
        _checksums_match_the_bytes(dst)
        fresh = get_model_spec("tiny").build_model("cpu")
        load_sliced(dst, fresh)
        pairs = zip(model.parameters(), fresh.parameters(), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)

    # Every kill starts from scratch, so the n-th call is the same call each time; kills spread
    # over the whole run, and the last two calls (publishing rename, final directory fsync).
    points = [*random.Random(0).sample(range(1, total - 1), 14), total - 1, total]
    partial, interrupted = tmp_path / ".sliced.partial", 0
    for kill_at in points:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
        proc = ctx.Process(target=_reslicer, args=(src, dst, kill_at, counts))
        proc.start()
        proc.join(timeout=300)  # a hang guard
        assert proc.exitcode == -signal.SIGKILL, (kill_at, proc.exitcode)
        if not dst.exists():
            interrupted += 1
            reslice(src, dst, with_optimizer=True)  # a rerun resumes what the killed run left
        check()
    # only the kill after publishing (the final directory fsync) left complete slices behind
    assert interrupted == len(points) - 1, interrupted
