"""Asynchronous checkpoints: the staged state is what lands, one save in flight, crash safety."""

import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from elastic_fns import async_run
from test_ckpt import _Big
from test_pretrain import _state

from ckpt import latest_checkpoint, list_checkpoints, load_sharded, verify
from ckpt.sharded import AsyncSave, save_sharded, wait_for_saves
from fsdpkit.testing import run_distributed


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = _Big()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return model, opt


def test_an_async_save_holds_the_state_at_the_call_not_after(tmp_path):
    model, opt = _model_and_opt()
    params = [p.detach().clone() for p in model.parameters()]
    momenta = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    pending = save_sharded(tmp_path / "step_1", model, opt, step=1, blocking=False)
    assert isinstance(pending, AsyncSave)
    with torch.no_grad():  # training goes on while the files are written
        for p in model.parameters():
            p.add_(1.0)
            opt.state[p]["momentum_buffer"].mul_(-1)
    assert pending.wait() == tmp_path / "step_1" and pending.done()
    verify(tmp_path / "step_1")
    fresh, fresh_opt = _model_and_opt(seed=1)
    assert load_sharded(tmp_path / "step_1", fresh, fresh_opt)["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(params, fresh.parameters(), strict=True))
    loaded = [fresh_opt.state[p]["momentum_buffer"] for p in fresh.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(momenta, loaded, strict=True))


def test_at_most_one_save_is_in_flight(tmp_path):
    model, opt = _model_and_opt()
    first = save_sharded(tmp_path / "step_1", model, opt, step=1, blocking=False)
    second = save_sharded(tmp_path / "step_2", model, opt, step=2, blocking=False, keep_last=1)
    assert first.done()  # the second call waited for the first to be published
    wait_for_saves()
    assert second.done() and [p.name for p in list_checkpoints(tmp_path)] == ["step_2"]


def test_an_async_save_error_reaches_the_next_call(tmp_path):
    model, opt = _model_and_opt()
    (tmp_path / "file").write_text("not a directory")
    save_sharded(tmp_path / "file" / "step_1", model, opt, step=1, blocking=False)
    with pytest.raises(OSError):
        save_sharded(tmp_path / "step_2", model, opt, step=2, blocking=False)
    wait_for_saves()  # nothing left in flight


@pytest.mark.dist
def test_async_saves_on_two_ranks_write_what_blocking_saves_write(tmp_path):
    blocking = run_distributed(async_run, 2, str(tmp_path / "b"), 4, False)[0]
    background = run_distributed(async_run, 2, str(tmp_path / "a"), 4, True)[0]
    assert blocking["losses"] == background["losses"]
    for step in (1, 2, 3, 4):
        name = f"checkpoints/step_{step:08d}"
        a, b = _state(str(tmp_path / "b" / name)), _state(str(tmp_path / "a" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step


def _async_saver(root: str, first_step: int) -> None:
    torch.set_num_threads(1)
    model, opt = _model_and_opt(seed=first_step)
    step = first_step
    while True:
        save_sharded(Path(root) / f"step_{step:04d}", model, opt, step=step, keep_last=3,
                     blocking=False)  # fmt: skip
        for p in model.parameters():  # the next step runs while the save is written
            p.grad = torch.randn_like(p)
        opt.step()
        step += 1


def test_sigkill_during_async_saves_never_leaves_a_complete_looking_bad_checkpoint(tmp_path):
    # test_ckpt's SIGKILL trials, with the writes in a background thread
    rng = random.Random(0)
    ctx = mp.get_context("fork")
    interrupted = 0
    for _ in range(24):
        done = list_checkpoints(tmp_path)
        first = int(done[-1].name.split("_")[1]) + 1 if done else 1
        proc = ctx.Process(target=_async_saver, args=(str(tmp_path), first))
        before = set(os.listdir(tmp_path))
        proc.start()
        deadline = time.monotonic() + 120  # hang guard: wait for the first save to begin
        while set(os.listdir(tmp_path)) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))  # then kill anywhere in the save/train cycle
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        interrupted += any(p.name.endswith(".partial") for p in tmp_path.iterdir())
        for ckpt in list_checkpoints(tmp_path):  # every complete-looking one is complete
            verify(ckpt)
        latest = latest_checkpoint(tmp_path)
        if latest is not None:
            model, opt = _model_and_opt(seed=1)
            assert load_sharded(latest, model, opt)["step"] == int(latest.name.split("_")[1])
    print(f"{interrupted} of 24 kills interrupted an async save")
    assert interrupted >= 3
