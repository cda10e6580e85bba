"""Planner benchmark: prints three tables and writes bench/results/planner.json.

1. ``fsdpkit plan --model regnet10b --batch 16`` as a whole process: median wall time and peak
   RSS over ``--repeat`` runs (targets: ≤ 5 s, ≤ 1.5 GB).
2. Plans for regnet10b, batch 16, world size 8, fp16, budgets 40 and 80 GiB: no
   checkpointing; every block; √n equal segments (Chen et al.); VISSL's hand-set groups
   ``[[2],[7],[9,17],[]]``; the paper's min-max; ours. Predicted peak, recompute %, fits.
3. Accuracy on CPU: predicted (symbolic, meta) vs measured peak of a real FP32 training step
   (SGD momentum + weight decay), for tiny and rg8gf at two batches, with no checkpointing and
   with the planner's plan (budget halfway between those two peaks' extremes).

    python bench/bench_planner.py [--repeat 5] [--skip-accuracy]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fsdpkit import get_model_spec
from planner import (
    MemoryConfig,
    estimate,
    make_plan,
    measure_step,
    plan_checkpoints,
    profile_model,
    solve_minmax,
    sqrt_segments,
)

GIB = 2**30


def cli_timing(repeat: int) -> dict:
    cmd = [str(Path(sys.executable).parent / "fsdpkit"), "plan", "--model", "regnet10b",
           "--batch", "16", "--json"]  # fmt: skip
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    rss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over the children
    return {"command": " ".join(cmd[1:]), "median_s": statistics.median(times),
            "times_s": times, "peak_rss_bytes": rss_kib * 1024}  # fmt: skip


def vissl_segments(model) -> list[tuple[int, int, bool]]:
    """VISSL regnet10B stage_checkpoints [[2],[7],[9,17],[]]: per stage, the block indices
    ending each checkpointed group (stage 1: 0-2, stage 2: 0-7, stage 3: 0-9 and 9-17)."""
    groups = [[2], [7], [9, 17], []]
    start = {}
    for i, info in enumerate(model.trunk.unit_info):
        start.setdefault(info.stage, i)
    segs, pos = [], 0
    for stage, ends in enumerate(groups, start=1):
        first = start[stage]
        for end in ends:
            if first > pos:
                segs.append((pos, first, False))
            segs.append((first, start[stage] + end, True))
            pos = first = start[stage] + end
    n = len(model.trunk.unit_info)
    if pos < n:
        segs.append((pos, n, False))
    return segs


def comparison() -> list[dict]:
    spec = get_model_spec("regnet10b")
    prof = profile_model(spec, 16, dtype="fp16")
    cfg = MemoryConfig(world_size=8, sharded=True, optimizer="sgd", overhead_bytes=GIB)
    n = len(prof.units)
    fixed = {
        "no checkpointing": [(0, n, False)],
        "every block": [(0, 1, False)] + [(i, i + 1, True) for i in range(1, n)],
        "√n segments": sqrt_segments(n),
        "VISSL groups": vissl_segments(spec.build_model("meta")),
    }
    rows = []
    for budget in (40 * GIB, 80 * GIB):
        plans = {k: make_plan(prof, v, cfg, budget_bytes=budget, objective=k)
                 for k, v in fixed.items()}  # fmt: skip
        segs, _ = solve_minmax(prof, cfg, budget)
        plans["paper min-max"] = make_plan(prof, segs, cfg, budget_bytes=budget,
                                           objective=f"min-max S={len(segs)}")  # fmt: skip
        plans["ours, whole units"] = plan_checkpoints(prof, budget, cfg, granularity="unit")
        plans["ours, per unit incl. selective"] = plan_checkpoints(prof, budget, cfg)
        for name, p in plans.items():
            rows.append({"budget_gib": budget / GIB, "plan": name, "peak_bytes": p.peak_bytes,
                         "recompute_fraction": p.recompute_fraction, "fits": p.fits,
                         "recompute_time_fraction": p.recompute_time_fraction,
                         "segments": [list(s) for s in p.segments],
                         "selective": p.selective_spec})  # fmt: skip
    return rows


def accuracy() -> list[dict]:
    step = MemoryConfig(optimizer="sgd", weight_decay=True)
    rows = []
    for name, batches in (("tiny", (8, 32)), ("rg8gf", (1, 2))):
        spec = get_model_spec(name)
        for batch in batches:
            prof = profile_model(spec, batch)
            n = len(prof.units)
            plain = estimate(prof, [(0, n, False)], step).peak_bytes
            lowest = estimate(prof, [(i, i + 1, True) for i in range(n)], step).peak_bytes
            plan = plan_checkpoints(prof, (plain + lowest) // 2, step)
            for label, segs, sel in (
                ("none", [(0, n, False)], ()),
                ("planned", list(plan.segments), plan.selective_spec),
            ):
                predicted = estimate(prof, segs, step, sel).peak_bytes
                measured = measure_step(spec, batch, segs, selective=sel).peak_bytes
                rows.append({"model": name, "batch": batch, "plan": label,
                             "segments": [list(s) for s in segs],
                             "selective": [list(x) for x in sel],
                             "predicted_bytes": predicted,
                             "measured_bytes": measured,
                             "error": (predicted - measured) / measured})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/planner.json"))
    args = parser.parse_args()
    console = Console(width=140)
    timing = cli_timing(args.repeat)
    console.print(
        f"[bold]{timing['command']}[/bold]: median {timing['median_s']:.2f} s over "
        f"{args.repeat} runs (target ≤ 5 s); peak RSS {timing['peak_rss_bytes'] / 1e9:.2f} GB "
        "(target ≤ 1.5 GB)"
    )
    rows = comparison()
    table = Table(title="regnet10b, batch 16, world size 8, fp16, SGD, 1 GiB overhead (predicted)")
    for col in ("budget", "plan", "peak", "recompute (FLOPs)", "(H100 roofline)", "fits"):
        table.add_column(col, justify="left" if col == "plan" else "right")
    for r in rows:
        table.add_row(f"{r['budget_gib']:.0f} GiB", r["plan"], f"{r['peak_bytes'] / GIB:.1f} GiB",
                      f"{r['recompute_fraction']:.1%}", f"{r['recompute_time_fraction']:.1%}",
                      "yes" if r["fits"] else "no")  # fmt: skip
    console.print(table)
    acc = [] if args.skip_accuracy else accuracy()
    if acc:
        t = Table(title="Predicted (meta) vs measured (CPU step) peak")
        for col in ("model", "batch", "plan", "predicted", "measured", "error"):
            t.add_column(col, justify="right")
        for r in acc:
            t.add_row(r["model"], str(r["batch"]), r["plan"],
                      f"{r['predicted_bytes'] / 2**20:,.1f} MiB",
                      f"{r['measured_bytes'] / 2**20:,.1f} MiB", f"{r['error']:+.2%}")  # fmt: skip
        console.print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cli": timing, "comparison": rows, "accuracy": acc}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
