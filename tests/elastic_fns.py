"""Per-rank bodies for the fault-tolerance tests (ranks import them by name)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from pretrain_fns import tiny_run

BIN = Path(sys.executable).parent


def hang_run(out: str, steps: int, rank: int, after_step: int, how: str, timeout_s: float):
    """``tiny_run`` where ``rank`` stops making progress after step ``after_step`` (1-based):
    ``how="sigstop"`` stops the process, ``"sleep"`` keeps it alive but away from the next
    collective. The watchdog (``collective_timeout_s=timeout_s``) must end the job."""

    def on_step(m: dict) -> None:
        if int(os.environ["RANK"]) == rank and m["step"] == after_step:
            if how == "sigstop":
                os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(3600)

    return tiny_run(out, steps, collective_timeout_s=timeout_s, on_step=on_step)


def slow_first_step(first_timeout_s: float, timeout_s: float, first_step_s: float) -> None:
    """A loop whose first step lasts ``first_step_s`` (longer than ``timeout_s``, shorter than
    ``first_timeout_s``) and whose second step never ends: the watchdog must let the first
    pass and end the job at the second."""
    from seer_train.distributed import Watchdog, distributed

    with distributed() as ctx:
        wd = Watchdog(timeout_s, ctx.rank, ctx.world_size, first_step_timeout_s=first_timeout_s)
        wd.beat(1)
        time.sleep(first_step_s)
        wd.beat(2)
        time.sleep(3600)


def async_run(out: str, steps: int, async_save: bool) -> dict:
    """``tiny_run`` saving after every step, in the background or not; keeps every checkpoint."""
    return tiny_run(out, steps, save_every=1, keep_last=steps + 1, async_save=async_save)


def workers_of(agent_pid: int) -> list[int]:
    """Pids of the processes whose parent is ``agent_pid`` (torchrun's workers), from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == agent_pid:
            pids.append(int(stat.parent.name))
    return pids


def _lines(metrics: Path) -> list[int]:
    """Steps in ``metrics.jsonl`` so far, complete lines only."""
    if not metrics.is_file():
        return []
    text = metrics.read_text()
    return [json.loads(x)["step"] for x in text[: text.rfind("\n") + 1].splitlines()]


def torchrun_with_kills(
    args: list[str],
    out: Path,
    kills: int,
    rng: random.Random,
    *,
    nproc: int = 2,
    max_delay_s: float = 2.0,
    timeout_s: float = 900.0,
) -> dict:
    """``torchrun --standalone --nproc-per-node nproc --max-restarts kills -m seer_train.cli
    pretrain *args --out out``, SIGKILLing a random worker ``kills`` times: each time the
    group has written a new step, after a random delay in [0, ``max_delay_s``] s (so the kill
    lands in the data loader, forward, a collective or a save alike).

    Returns ``returncode``, ``stderr`` (tail), ``kills`` (done: the run may end first) and
    ``lost``: per kill, the steps computed again after the restart (the last step written
    before the kill minus the step the restarted group resumed from).
    """
    cmd = [
        str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc),
        "--max-restarts", str(kills), "--monitor-interval", "0.1",
        "-m", "seer_train.cli", "pretrain", *args, "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    with open(out.parent / f"{out.name}.stderr", "w+") as err:
        agent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        marks: list[tuple[int, int]] = []  # (lines written, last step) at each kill
        try:
            while len(marks) < kills and agent.poll() is None:
                seen = len(_lines(metrics))
                while agent.poll() is None and len(_lines(metrics)) <= seen:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{cmd}: no progress after {timeout_s:g} s")
                    time.sleep(0.05)
                time.sleep(rng.uniform(0, max_delay_s))
                pids = workers_of(agent.pid)
                if agent.poll() is not None or not pids:
                    break
                steps = _lines(metrics)
                os.kill(rng.choice(pids), signal.SIGKILL)
                marks.append((len(steps), steps[-1]))
            agent.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
        err.seek(0)
        tail = err.read()[-4000:]
    steps = _lines(metrics)
    lost = [last - (steps[n] - 1) for n, last in marks if n < len(steps)]
    return {"returncode": agent.returncode, "stderr": tail, "kills": len(marks), "lost": lost}


def same_checkpoint(a: Path, b: Path) -> list[str]:
    """Tensors (parameters, buffers, optimizer state; not RNG) that differ bitwise between two
    sharded checkpoints of the same world size; ``["<files>"]`` if their files differ."""
    from safetensors import safe_open

    files = sorted(p.name for p in a.glob("rank_*.safetensors"))
    if files != sorted(p.name for p in b.glob("rank_*.safetensors")) or not files:
        return ["<files>"]
    differ = []
    for name in files:
        with safe_open(a / name, "pt") as x, safe_open(b / name, "pt") as y:
            keys = [k for k in x.keys() if not k.startswith("rng/")]  # noqa: SIM118
            if sorted(keys) != sorted(k for k in y.keys() if not k.startswith("rng/")):  # noqa: SIM118
                return [f"{name}: <names>"]
            differ += [f"{name}:{k}" for k in keys if not x.get_tensor(k).equal(y.get_tensor(k))]
    return differ
