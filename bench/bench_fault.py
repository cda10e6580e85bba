"""Fault benchmark: random SIGKILLs under ``torchrun --max-restarts``; prints a table and writes
bench/results/fault.json.

``seer-train pretrain`` (``tiny``, 2 local ranks, gloo) runs once uninterrupted, then in runs
where a random worker is SIGKILLed at random moments (each after the group wrote a new step,
plus a random delay: data, forward, a collective or a save alike) until ``--kills`` kills are
done. The agent restarts the group, which resumes from the newest complete checkpoint. Per
run: the final checkpoint against the uninterrupted one (a divergence is any tensor not
bitwise equal; must be 0) and the steps computed again per failure (≤ ``--save-every``).

    python bench/bench_fault.py [--kills 20] [--kills-per-run 5] [--steps 30] [--save-every 3]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

from _report import report
from rich.table import Table

# The kill driver is shared with the tests (tests/elastic_fns.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from elastic_fns import same_checkpoint, torchrun_with_kills


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs in all")
    ap.add_argument("--kills-per-run", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--save-every", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--max-delay-s", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fsdpkit-bench-fault"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fault.json")
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    cli = ["--model", "tiny", "--batch-size", "4", "--synthetic-images", "64", "--workers", "0",
           "--steps", str(args.steps), "--save-every", str(args.save_every), "--keep-last", "2",
           "--no-reslice", "--json"]  # fmt: skip
    final = Path("checkpoints") / f"step_{args.steps:08d}"
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    ref = torchrun_with_kills(cli, args.dir / "ref", 0, rng, nproc=args.ranks)
    if ref["returncode"]:
        sys.exit(f"bench_fault: the uninterrupted run failed:\n{ref['stderr']}")
    ref_s = time.perf_counter() - t0
    runs: list[dict] = []
    while sum(r["kills"] for r in runs) < args.kills and len(runs) < 3 * args.kills:
        want = min(args.kills_per_run, args.kills - sum(r["kills"] for r in runs))
        out = args.dir / f"run{len(runs)}"
        t0 = time.perf_counter()
        r = torchrun_with_kills(cli, out, want, rng, nproc=args.ranks,
                                max_delay_s=args.max_delay_s)  # fmt: skip
        r["wall_s"] = time.perf_counter() - t0
        r["differ"] = same_checkpoint(args.dir / "ref" / final, out / final)
        r["stderr"] = r["stderr"] if r["returncode"] else ""
        runs.append(r)
        print(f"run {len(runs)}: {r['kills']} kills, rc {r['returncode']}, lost {r['lost']}, "
              f"{len(r['differ'])} tensors differ", flush=True)  # fmt: skip
    lost = [n for r in runs for n in r["lost"]]
    kills = sum(r["kills"] for r in runs)
    divergent = sum(bool(r["differ"]) or r["returncode"] != 0 for r in runs)
    table = Table(title=f"SIGKILL at random moments under torchrun --max-restarts: tiny, "
                        f"{args.ranks} ranks, {args.steps} steps, checkpoint every "
                        f"{args.save_every}")  # fmt: skip
    for col in ("run", "kills", "steps lost per failure", "final state", "wall s"):
        table.add_column(col, justify="left" if col == "steps lost per failure" else "right")
    table.add_row("uninterrupted", "0", "-", "reference", f"{ref_s:.0f}")
    for i, r in enumerate(runs):
        state = "failed" if r["returncode"] else ("bitwise equal" if not r["differ"] else
                                                  f"{len(r['differ'])} tensors differ")  # fmt: skip
        table.add_row(str(i), str(r["kills"]), str(r["lost"]), state, f"{r['wall_s']:.0f}")
    mean = statistics.mean(lost) if lost else 0.0
    table.add_row("all", str(kills), f"mean {mean:.2f}, max {max(lost, default=0)}",
                  f"{divergent} divergent runs", "")  # fmt: skip
    report(table, args.out, {
        "kills": kills, "runs": len(runs), "divergent_runs": divergent,
        "steps_lost_per_failure": lost, "steps_lost_mean": mean,
        "config": vars(args) | {"dir": str(args.dir), "out": str(args.out)},
        "detail": runs, "reference_wall_s": ref_s,
    })  # fmt: skip


if __name__ == "__main__":
    main()
