"""Training-step benchmark: the SwAV step vs the loader that feeds it; GPU throughput.

On this CPU machine (default ``--model tiny``, 2 gloo ranks): images/s of the whole
``train_step`` (planned checkpointing, FSDP, SyncBN, LARC; photometric augmentation included,
as it runs on the training device) next to the loader's images/s per rank (Pillow/numpy
decoding and crop geometry in loader workers; ``bench_data.loader_rows``). The loader must
outpace the step, or the device waits.

On a GPU (``--device cuda``, e.g. ``--model rg256gf --ranks 1``): images/s, achieved TFLOP/s
(model FLOPs of forward + backward, plus recomputation, per second) and peak memory next to
the planner's prediction.

    python bench/bench_train.py [--model tiny] [--batch 32] [--ranks 2] [--steps 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _report import report
from rich.table import Table

from fsdpkit.testing import run_distributed
from kitcore.units import format_bytes
from seer_train.data import PhotometricAugment
from seer_train.train import TrainConfig, build, make_optimizer, solve_plan, train_step


def _rank_body(cfg: TrainConfig, steps: int, device_type: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    plan = solve_plan(cfg, world)
    model, _ = build(cfg, plan, device)
    opt = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "fp16")
    augment = PhotometricAugment().to(device)
    g = torch.Generator().manual_seed(rank)
    sizes = cfg.preset.crop_sizes
    crops = [torch.randint(0, 256, (cfg.batch_size, 3, s, s), generator=g, dtype=torch.uint8)
             for s in sizes]  # fmt: skip
    times = []
    for i in range(steps + 1):  # the first step (lazy init, allocator warm-up) is not timed
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        views = augment([c.to(device, non_blocking=True) for c in crops], seed=i)
        train_step(model, opt, scaler, views, iteration=i, lr=0.01, cfg=cfg)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"step_s": statistics.median(times[1:]), "peak_bytes": peak,
            "planned_bytes": plan.peak_bytes,
            "flops": plan.step_flops + plan.recompute_flops,
            "segments": [s[:2] for s in plan.segments if s[2]]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=32, help="images per rank")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--memory-budget", type=float, help="GiB per rank for the plan")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-loader", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    args = ap.parse_args()
    budget = int(args.memory_budget * 2**30) if args.memory_budget else None
    cfg = TrainConfig(model=args.model, batch_size=args.batch, dtype=args.dtype,
                      memory_budget=budget)  # fmt: skip
    backend = "nccl" if args.device == "cuda" else "gloo"
    ranks = run_distributed(_rank_body, args.ranks, cfg, args.steps, args.device,
                            backend=backend, timeout_s=1800)  # fmt: skip
    step_s = max(r["step_s"] for r in ranks)
    r0 = ranks[0]
    images_s = args.batch * args.ranks / step_s
    rows = [{"what": f"train_step, {args.model}, {args.ranks} ranks × {args.batch}, {args.dtype}",
             "images_per_s": images_s, "step_s": step_s,
             "tflops_per_rank": r0["flops"] / step_s / 1e12,
             "peak_bytes": r0["peak_bytes"], "planned_bytes": r0["planned_bytes"],
             "checkpointed": r0["segments"]}]  # fmt: skip
    if not args.no_loader:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_data import measure

        for row in measure(args.batch, batches=4, jpegs=128, repeats=1):
            what = f"{row['stage']} per rank: {row['data']}, {row['workers']} workers"
            rows.append({"what": what, "images_per_s": row["images_per_s"]})
    table = Table(title=f"SwAV training step vs loader ({args.device})")
    for col in ("what", "images/s", "vs step", "step s", "TFLOP/s/rank", "peak", "plan"):
        table.add_column(col, justify="left" if col == "what" else "right")
    per_rank_step = images_s / args.ranks
    for row in rows:
        is_step = "step_s" in row
        ratio = row["images_per_s"] / (images_s if is_step else per_rank_step)
        peak = row.get("peak_bytes")
        plan = format_bytes(row["planned_bytes"]) if is_step else ""
        table.add_row(
            row["what"], f"{row['images_per_s']:.1f}", f"{ratio:.2f}×",
            f"{row['step_s']:.3f}" if is_step else "",
            f"{row['tflops_per_rank']:.3g}" if is_step else "",
            format_bytes(peak) if peak else "", plan,
        )  # fmt: skip
    report(table, Path(args.out), {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
