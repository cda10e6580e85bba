"""Asynchronous checkpoint benchmark: training stall per save, background vs blocking; prints a
table and writes bench/results/async_save.json.

A ``--model`` (default rg8gf) sharded by fsdpkit on 2 gloo ranks with SGD momentum, trained
step by step on ``--batch`` images per rank; one run, both modes, alternating
(``--rounds``):

- blocking: the step loop waits for ``save_sharded`` (write, fsync, publish) to return;
- background: ``save_sharded(blocking=False)`` returns once this rank's state is staged;
  the loop keeps training while a thread writes. Its stall is the call plus whatever the
  steps run during the write lost against steps without one (the writer shares the CPU).

The issue's target: background stall ≤ 20% of the blocking save.

    python bench/bench_async_save.py [--model rg8gf] [--batch 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _report import report
from rich.table import Table
from torch.distributed.tensor import DTensor

from ckpt.sharded import save_sharded
from fsdpkit import FSDPPolicy, get_model_spec, parallelize
from fsdpkit.testing import run_distributed


def _train(model_name: str, batch: int):
    spec = get_model_spec(model_name)
    torch.manual_seed(0)
    model = spec.build_model("cpu")
    units = [m for _, m in spec.named_units(model)]
    parallelize(model, units=units, policy=FSDPPolicy(sync_bn_group_size=-1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = spec.example_input(batch, torch.device("cpu"))

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        spec.training_loss(model(x)).backward()
        opt.step()
        dist.barrier()
        return time.perf_counter() - t0

    return model, opt, step


def measure(model_name: str, batch: int, rounds: int, root: str) -> dict:
    model, opt, step = _train(model_name, batch)
    step()  # warm-up; momentum buffers exist from here on
    alone = statistics.median(step() for _ in range(3))
    out: dict[str, list] = {"blocking_s": [], "staging_s": [], "write_s": [], "lost_s": [],
                            "steps_during": []}  # fmt: skip
    for r in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        save_sharded(Path(root) / f"blocking_{r}", model, opt, step=r)
        dist.barrier()
        out["blocking_s"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        pending = save_sharded(Path(root) / f"async_{r}", model, opt, step=r, blocking=False)
        staged = time.perf_counter()
        during = [step()]  # at least one step overlaps the write
        while not pending.done():
            during.append(step())
        pending.wait()
        out["staging_s"].append(staged - t0)
        out["write_s"].append(time.perf_counter() - t0)
        out["lost_s"].append(max(0.0, sum(during) - len(during) * alone))
        out["steps_during"].append(len(during))
        shutil.rmtree(Path(root) / f"blocking_{r}", ignore_errors=True)
        shutil.rmtree(Path(root) / f"async_{r}", ignore_errors=True)
        dist.barrier()
    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    shard = sum(t.numel() * t.element_size() for t in local)
    return out | {"step_s": alone, "param_bytes_rank": shard}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="rg8gf")
    ap.add_argument("--batch", type=int, default=2, help="images per rank per step")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fsdpkit-bench-async"))
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "async_save.json")  # fmt: skip
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    r = run_distributed(measure, args.ranks, args.model, args.batch, args.rounds, str(args.dir),
                        timeout_s=3600)[0]  # fmt: skip
    blocking = statistics.median(r["blocking_s"])
    stall = statistics.median(s + lost for s, lost in zip(r["staging_s"], r["lost_s"], strict=True))
    table = Table(title=f"Training stall per checkpoint: {args.model}, {args.ranks} gloo ranks, "
                        f"batch {args.batch}/rank, step {r['step_s']:.2f} s alone, "
                        f"median of {args.rounds}")  # fmt: skip
    for col in (
        "mode",
        "stall per save s",
        "of which staging s",
        "slower steps s",
        "save published after s",
        "stall / blocking",
    ):
        table.add_column(col, justify="right" if col != "mode" else "left")
    table.add_row("blocking save_sharded", f"{blocking:.2f}", "-", "-", f"{blocking:.2f}", "100%")
    table.add_row("save_sharded(blocking=False)", f"{stall:.2f}",
                  f"{statistics.median(r['staging_s']):.2f}",
                  f"{statistics.median(r['lost_s']):.2f}",
                  f"{statistics.median(r['write_s']):.2f}",
                  f"{100 * stall / blocking:.0f}%")  # fmt: skip
    report(table, args.out, r | {"model": args.model, "ranks": args.ranks, "batch": args.batch,
                                 "blocking_median_s": blocking, "async_stall_median_s": stall,
                                 "stall_ratio": stall / blocking})  # fmt: skip


if __name__ == "__main__":
    main()
