"""LARC on sharded parameters: prints a table and writes bench/results/larc.json.

Two gloo ranks on this machine; an rg8gf SwAV model (67 M parameters) sharded with FSDP2 per
unit; synthetic gradients. Per optimizer step (median of ``--steps``):

- ``sgd``: plain SGD with momentum and weight decay (no LARC), the floor;
- ``fsdpkit.LARC``: local sums of squares, one all-reduce of 2L elements;
- ``per-parameter all-reduce``: the same maths with 2L all-reduces and a host read per
  parameter (apex's structure made distributed);
- ``gather-then-norm``: all-gather each parameter and gradient, then take norms (what a LARC
  needing full weights does under FSDP).

    python bench/bench_larc.py [--steps 5] [--model rg8gf]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _report import report
from rich.table import Table
from torch.distributed.tensor import DTensor

from fsdpkit import LARC, CommCounter, get_model_spec
from fsdpkit.testing import run_distributed

ETA, LR, WD = 0.001, 0.1, 1e-5


def _naive_adapt(params, *, gather: bool) -> None:
    """LARC's rate per parameter, one parameter at a time, reading norms on the host."""
    for p in params:
        w, g = p.to_local(), p.grad.to_local()
        if gather:  # all-gather the whole parameter and gradient
            w_norm = p.full_tensor().norm().item()
            g_norm = p.grad.full_tensor().norm().item()
        else:  # two all-reduces of one element each
            sq = [w.float().square().sum(), g.float().square().sum()]
            for t in sq:
                dist.all_reduce(t)
            w_norm, g_norm = sq[0].sqrt().item(), sq[1].sqrt().item()
        if w_norm > 0 and g_norm > 0:
            g.add_(w, alpha=WD).mul_(ETA * w_norm / (g_norm + WD * w_norm + 1e-8))


def _rank_bench(model_name: str, steps: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    spec = get_model_spec(model_name)
    model = spec.build_model("cpu")
    for _, unit in spec.named_units(model):
        fully_shard(unit)
    fully_shard(model.head)
    fully_shard(model.prototypes)
    fully_shard(model)
    params = [p for p in model.parameters()]
    for p in params:  # synthetic gradients, sharded like their parameters
        local = torch.randn_like(p.to_local())
        p.grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape,
                                    stride=p.stride())  # fmt: skip
    variants = {
        "sgd": None,
        "fsdpkit.LARC": "larc",
        "per-parameter all-reduce": "allreduce",
        "gather-then-norm": "gather",
    }
    out = {}
    for label, kind in variants.items():
        sgd = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=0.0 if kind else WD)
        opt = LARC(sgd, trust_coefficient=ETA) if kind == "larc" else sgd
        times, comm = [], None
        for _ in range(steps + 1):  # the first step creates momentum buffers: not timed
            dist.barrier()
            t0 = time.perf_counter()
            with CommCounter() as c:
                if kind in ("allreduce", "gather"):
                    with torch.no_grad():
                        _naive_adapt(params, gather=kind == "gather")
                opt.step()
            times.append(time.perf_counter() - t0)
            comm = c
        out[label] = {
            "step_s": statistics.median(times[1:]),
            "collectives": sum(comm.counts.values()),
            "bytes": sum(comm.bytes.values()),
            "by_kind": comm.summary(),
        }
    out["parameters"] = len(params)
    out["numel"] = sum(p.numel() for p in params)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model", default="rg8gf")
    parser.add_argument("--out", type=Path, default=Path("bench/results/larc.json"))
    args = parser.parse_args()
    results = run_distributed(_rank_bench, 2, args.model, args.steps, timeout_s=900)
    r0 = results[0]
    base = r0["fsdpkit.LARC"]
    table = Table(title=f"LARC step, {args.model} ({r0['numel'] / 1e6:.1f} M parameters in "
                  f"{r0['parameters']} tensors), FSDP2 on 2 gloo ranks (rank 0, median of "
                  f"{args.steps})")  # fmt: skip
    for col in ("variant", "step", "× LARC", "collectives", "bytes moved", "× LARC bytes"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for label, v in r0.items():
        if not isinstance(v, dict):
            continue
        table.add_row(label, f"{v['step_s'] * 1e3:,.1f} ms", f"{v['step_s'] / base['step_s']:.2f}",
                      f"{v['collectives']:,}", f"{v['bytes']:,}",
                      f"{v['bytes'] / base['bytes']:,.1f}" if base["bytes"] else "—")  # fmt: skip
    report(table, args.out, {"model": args.model, "ranks": results})


if __name__ == "__main__":
    main()
