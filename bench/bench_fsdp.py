"""FSDP wrapper benchmark: prints a table and writes bench/results/fsdp.json.

Two gloo ranks on this machine, a small RegNetY (``--model``, default ``tiny``) with SwAV
multi-crop input, ``--batch`` images per rank, SGD with momentum. Per variant (rank 0, median
of ``--steps`` after a warm-up step): step time, peak tensor memory per rank (live storages:
parameters, gradients, optimizer state, activations), exposed communication time (issuing and
waiting for collectives), and collectives per step.

- ``parallelize``: fsdpkit defaults (global SyncBatchNorm, BatchNorm parameters replicated in
  FP32 with one bucketed gradient all-reduce, FP32 heads, prefetch 1);
- ``parallelize, no prefetch``: the same with prefetch 0;
- ``parallelize, BN as FSDP units``: every BatchNorm its own FP32 FSDP unit instead;
- ``parallelize, local BN``: no SyncBatchNorm (as the two peers below run), to separate what
  synchronised statistics cost;
- ``fully_shard defaults``: FSDP2 per unit + root, no policy, local BatchNorm;
- ``DDP``: DistributedDataParallel, local BatchNorm;
- ``one process``: the same per-rank batch on one process (no communication).

    python bench/bench_fsdp.py [--model tiny] [--batch 16] [--steps 5]
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
from torch.utils._pytree import tree_leaves

from fsdpkit import CommCounter, FSDPPolicy, get_model_spec, parallelize
from fsdpkit.testing import run_distributed
from planner.tracker import LiveMemory


def _build(variant: str, spec):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = spec.build_model("cpu")
    if variant.startswith("parallelize"):
        policy = FSDPPolicy(
            fp32_modules=("head", "prototypes"),
            prefetch=0 if "no prefetch" in variant else 1,
            batchnorm="units" if "BN as FSDP units" in variant else "replicate",
            sync_bn_group_size=1 if "local BN" in variant else None,
        )
        parallelize(model, units=[m for _, m in spec.named_units(model)], policy=policy)
    elif variant == "fully_shard defaults":
        for _, unit in spec.named_units(model):
            fully_shard(unit)
        fully_shard(model)
    elif variant == "DDP":
        model = DDP(model)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _rank_bench(model_name: str, batch: int, steps: int, variants: list[str]) -> dict:
    spec = get_model_spec(model_name)
    out = {}
    for variant in variants:
        if variant == "one process" and dist.get_rank() != 0:
            dist.barrier()
            continue
        model = _build(variant, spec)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        torch.manual_seed(dist.get_rank())
        crops = spec.example_input(batch, torch.device("cpu"))
        times, peaks, exposed, comm = [], [], [], None
        for step in range(steps + 1):
            tracker = LiveMemory()
            state = [t for st in opt.state.values() for t in tree_leaves(st) if torch.is_tensor(t)]
            tracker.register([_local(t) for t in (*model.parameters(), *model.buffers(), *state)])
            tracker.register(crops)
            if variant != "one process":
                dist.barrier()
            t0 = time.perf_counter()
            with CommCounter() as c, tracker:
                loss = spec.training_loss(model(crops))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                del loss
            if step:  # the first step creates optimizer state and warms up
                times.append(time.perf_counter() - t0)
                peaks.append(tracker.peak)
                exposed.append(c.exposed_s)
                comm = c
        out[variant] = {
            "step_s": statistics.median(times),
            "peak_bytes": max(peaks),
            "exposed_comm_s": statistics.median(exposed),
            "collectives": sum(comm.counts.values()),
            "comm_bytes": sum(comm.bytes.values()),
        }
        if variant == "one process":
            dist.barrier()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/fsdp.json"))
    args = parser.parse_args()
    variants = ["parallelize", "parallelize, no prefetch", "parallelize, BN as FSDP units",
                "parallelize, local BN", "fully_shard defaults", "DDP", "one process"]  # fmt: skip
    results = run_distributed(_rank_bench, 2, args.model, args.batch, args.steps, variants,
                              timeout_s=1800)  # fmt: skip
    r0 = results[0]
    base = r0["parallelize"]
    table = Table(title=f"{args.model}, {args.batch} images per rank (the preset's crop set), "
                  f"2 gloo ranks, rank 0, median of {args.steps} steps")  # fmt: skip
    for col in ("variant", "step", "× parallelize", "peak memory / rank", "exposed comm",
                "collectives", "bytes moved"):  # fmt: skip
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, v in r0.items():
        table.add_row(name, f"{v['step_s'] * 1e3:,.0f} ms", f"{v['step_s'] / base['step_s']:.2f}",
                      f"{v['peak_bytes'] / 2**20:,.1f} MiB", f"{v['exposed_comm_s'] * 1e3:,.1f} ms",
                      f"{v['collectives']:,}", f"{v['comm_bytes'] / 2**20:,.2f} MiB")  # fmt: skip
    report(table, args.out, {"model": args.model, "batch": args.batch, "ranks": results})


if __name__ == "__main__":
    main()
