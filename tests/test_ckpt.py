"""Sharded checkpoints: exact resume, crash safety under SIGKILL, one-line errors."""

import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ckpt_fns import resume, train
from kill_fns import kill_at_nth_call
from torch import nn

from ckpt import (
    CheckpointError,
    inspect,
    latest_checkpoint,
    list_checkpoints,
    load_sharded,
    save_sharded,
    verify,
)
from fsdpkit import get_model_spec
from fsdpkit.testing import run_distributed


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = get_model_spec("tiny").build_model("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    spec = get_model_spec("tiny")
    spec.training_loss(model(spec.example_input(2, torch.device("cpu")))).backward()
    opt.step()
    return model, opt


@pytest.fixture
def saved(tmp_path):
    model, opt = _model_and_opt()
    return save_sharded(tmp_path / "step_1", model, opt, step=1, extra={"lr": 0.1}), model, opt


def test_round_trip_restores_model_optimizer_rng_and_extra(saved):
    path, model, opt = saved
    expected_rng = torch.get_rng_state()
    model2, opt2 = _model_and_opt(seed=1)
    torch.manual_seed(123)
    manifest = load_sharded(path, model2, opt2)
    assert manifest["step"] == 1 and manifest["extra"] == {"lr": 0.1}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert all(torch.equal(s1["state"][k]["momentum_buffer"], s2["state"][k]["momentum_buffer"])
               for k in s1["state"])  # fmt: skip
    assert torch.equal(torch.get_rng_state(), expected_rng)
    info = inspect(path)
    assert info["world_size"] == 1 and info["kinds"]["param"]["tensors"] == 84


def test_never_overwrites_and_keeps_the_last_n(tmp_path, saved):
    path, model, opt = saved
    with pytest.raises(CheckpointError, match="never overwritten"):
        save_sharded(path, model, opt, step=1)
    for step in (2, 3, 4):
        save_sharded(tmp_path / f"step_{step}", model, opt, step=step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_3", "step_4"]
    (tmp_path / ".step_5.partial").mkdir()  # an interrupted save
    assert latest_checkpoint(tmp_path).name == "step_4"


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corruption_is_named_and_nothing_is_loaded(saved):
    path, *_ = saved
    manifest = json.loads((path / "manifest.json").read_text())
    shard = manifest["tensors"]["param/trunk.units.3.b.weight"]["shards"][0]
    _flip(path / shard["file"], shard["offsets"][0] + 5)
    with pytest.raises(CheckpointError, match=r"rank_00000.safetensors: tensor "
                       r"param/trunk\.units\.3\.b\.weight: checksum mismatch"):  # fmt: skip
        verify(path)
    model, opt = _model_and_opt(seed=2)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_sharded(path, model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_truncated_missing_and_incomplete(saved):
    path, *_ = saved
    f = path / "rank_00000.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"rank_00000\.safetensors: \d+ bytes, the manifest"):
        verify(path)
    f.unlink()
    with pytest.raises(CheckpointError, match=r"rank_00000\.safetensors: missing \(rank 0"):
        verify(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        verify(path)


def test_another_model_and_unsafe_manifest(saved, tmp_path):
    path, *_ = saved
    vit = get_model_spec("toy_models:vit_spec").build_model("cpu")
    with pytest.raises(CheckpointError, match="another model"):
        load_sharded(path, vit)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = {"rank": 1, "bytes": 1}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="leaves the checkpoint"):
        verify(path)


def test_cli_verify_and_inspect(saved):
    path, *_ = saved
    script = Path(sys.executable).parent / "ckpt"
    ok = subprocess.run([script, "verify", str(path), "--json"], capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"]
    out = subprocess.run([script, "inspect", str(path), "--json"], capture_output=True, text=True)
    assert json.loads(out.stdout)["step"] == 1
    (path / "manifest.json").unlink()
    bad = subprocess.run([script, "verify", str(path)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a complete" in bad.stderr


@pytest.mark.dist
def test_resume_is_exact_and_world_size_is_checked(tmp_path):
    path = tmp_path / "step_3"
    straight = run_distributed(train, 2, 6)
    first = run_distributed(train, 2, 3, 3, path)
    resumed = run_distributed(resume, 2, path, 3, 3)  # new processes
    for rank in range(2):
        assert first[rank][0] + resumed[rank][0] == straight[rank][0]  # equal losses
        for a, b in zip(resumed[rank][1], straight[rank][1], strict=True):
            assert torch.equal(a, b)  # bitwise-equal parameters
    with pytest.raises(CheckpointError, match="saved on world size 2, loading on 1"):
        load_sharded(path, get_model_spec("tiny").build_model("cpu"))


# ---- crash safety: a saving process killed with SIGKILL at random moments ---------------


class _Big(nn.Module):
    """~20 MB of parameters: a save takes long enough to be interrupted mid-write."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(5)])


def _saver(root: str, first_step: int, kill_at: int | None, saves: int | None, counts) -> None:
    """Save checkpoints in a loop (``saves`` of them, or forever); SIGKILL this process just
    before its ``kill_at``-th write step: a tensor's bytes, an fsync, a rename, a removal.
    Counting steps instead of sleeping makes where kills land independent of the machine's
    speed and load. Puts the number of steps taken on ``counts`` when it ends by itself."""
    import shutil

    import ckpt._format

    torch.set_num_threads(1)
    targets = [(ckpt._format, "_raw")]  # once per tensor written, before its bytes
    targets += [(os, "fsync"), (os, "rename"), (os, "replace"), (shutil, "rmtree")]
    made = kill_at_nth_call(targets, kill_at)
    torch.manual_seed(first_step)
    model = _Big()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = first_step
    while saves is None or step < first_step + saves:
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        save_sharded(Path(root) / f"step_{step:04d}", model, opt, step=step, keep_last=3)
        step += 1
    counts.put(made())


def test_sigkill_during_saves_never_leaves_a_complete_looking_bad_checkpoint(tmp_path):
    ctx = mp.get_context("fork")
    counts = ctx.Queue()
    # write steps of 4 saves from scratch (the 4th removes the oldest of keep_last=3)
    proc = ctx.Process(target=_saver, args=(str(tmp_path / "count"), 1, None, 4, counts))
    proc.start()
    total = counts.get(timeout=300)  # a hang guard
    proc.join()
    assert proc.exitcode == 0 and total > 40, total
    rng = random.Random(0)
    interrupted = 0
    for _ in range(24):
        done = list_checkpoints(tmp_path)
        first = int(done[-1].name.split("_")[1]) + 1 if done else 1
        # kill inside the first 4 saves of this run (writes, fsyncs, publish, pruning)
        kill_at = rng.randint(1, total)
        proc = ctx.Process(target=_saver, args=(str(tmp_path), first, kill_at, None, counts))
        proc.start()
        proc.join(timeout=300)  # a hang guard
        assert proc.exitcode == -signal.SIGKILL, proc.exitcode
        interrupted += any(p.name.endswith(".partial") for p in tmp_path.iterdir())
        for ckpt in list_checkpoints(tmp_path):  # every complete-looking one is complete
            verify(ckpt)
        latest = latest_checkpoint(tmp_path)
        if latest is not None:
            model = _Big()
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            assert load_sharded(latest, model, opt)["step"] == int(latest.name.split("_")[1])
    print(f"{interrupted} of 24 kills interrupted a save")
    assert interrupted >= 3  # the kills did land in the middle of saves
