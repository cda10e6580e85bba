"""Checkpoint benchmark: prints a table and writes bench/results/ckpt.json.

A ``--model`` (default rg32gf: 178 M parameters; parameters + SGD momentum ≈ 1.4 GB) sharded
by fsdpkit on 2 gloo ranks, all on this machine's disk, one run (reslice: ``--repeat``):

- save: ``ckpt.save_sharded`` vs ``torch.distributed.checkpoint.save`` of the same state;
- reslice: throughput vs a raw sequential copy of the same bytes with fsync (target ≥ 70%),
  the median of ``--repeat`` rounds that run both, in alternating order, each from a synced
  disk (one pair of runs on a shared disk swings 0.3× to 3×); and peak RSS (the largest of
  the rounds) vs loading every shard and consolidating in memory (VISSL's converter);
- load: ``load_sliced`` on 1 and 3 ranks vs ``dcp.load`` resharding onto 3 ranks.

    python bench/bench_ckpt.py [--model rg32gf] [--dir /tmp/fsdpkit-bench-ckpt] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _report import report
from rich.table import Table

from ckpt import load_sliced, save_sharded
from fsdpkit import FSDPPolicy, get_model_spec, parallelize
from fsdpkit.testing import run_distributed


def _sharded(model_name: str):
    spec = get_model_spec(model_name)
    torch.manual_seed(0)
    model = spec.build_model("cpu")
    named = spec.named_units(model)
    parallelize(model, units=[m for _, m in named], policy=FSDPPolicy(sync_bn_group_size=-1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # momentum buffers exist
    return spec, model, opt, [*(n for n, _ in named), "head", "prototypes"]


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def save_both(model_name: str, root: str) -> dict:
    import torch.distributed.checkpoint as dcp

    _, model, opt, units = _sharded(model_name)
    root = Path(root)
    ours = _timed(lambda: save_sharded(root / "sharded", model, opt, step=1, units=units))
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    theirs = _timed(lambda: dcp.save(state, checkpoint_id=str(root / "dcp")))
    return {"save_sharded_s": ours, "dcp_save_s": theirs}


def load_both(model_name: str, root: str, with_dcp: bool) -> dict:
    import torch.distributed.checkpoint as dcp

    _, model, _, _ = _sharded(model_name)
    root = Path(root)
    out = {"load_sliced_s": _timed(lambda: load_sliced(root / "sliced", model))}
    if with_dcp:
        state = {"model": model.state_dict()}
        out["dcp_load_s"] = _timed(lambda: dcp.load(state, checkpoint_id=str(root / "dcp")))
    return out


def _child(setup: str, code: str) -> tuple[float, int]:
    """Run ``setup`` then ``code`` in a fresh interpreter; (seconds of ``code`` alone, the
    process's peak RSS in bytes, imports included)."""
    script = f"import resource, time\n{setup}\nt0 = time.perf_counter()\n{code}\n" + (
        "print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                         text=True).stdout.split()  # fmt: skip
    return float(out[-2]), int(out[-1]) * 1024


def _raw_copy(src: Path, dst: Path) -> float:
    """Sequential copy of every file with fsync: what the disk gives."""
    dst.mkdir()
    t0 = time.perf_counter()
    for f in sorted(src.iterdir()):
        with open(f, "rb") as fi, open(dst / f.name, "wb") as fo:
            shutil.copyfileobj(fi, fo, 16 << 20)
            fo.flush()
            os.fsync(fo.fileno())
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rg32gf")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/fsdpkit-bench-ckpt"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/ckpt.json"))
    parser.add_argument("--repeat", type=int, default=3, help="raw copy / reslice rounds")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    root = str(args.dir)
    saves = run_distributed(save_both, 2, args.model, root, timeout_s=1800)[0]
    shard_bytes = sum(f.stat().st_size for f in (args.dir / "sharded").iterdir())
    copies, reslices, rss = [], [], []
    for r in range(args.repeat):
        for what in ("copy", "sliced")[:: 1 if r % 2 == 0 else -1]:  # neither always goes first
            shutil.rmtree(args.dir / what, ignore_errors=True)
            os.sync()  # start each disk measurement without the previous one's dirty pages
            if what == "copy":
                copies.append(_raw_copy(args.dir / "sharded", args.dir / "copy"))
            else:
                t, peak = _child(
                    "from ckpt import reslice",
                    f"reslice({root!r} + '/sharded', {root!r} + '/sliced', with_optimizer=True)",
                )
                reslices.append(t)
                rss.append(peak)
    copy_s, reslice_s = statistics.median(copies), statistics.median(reslices)
    reslice_rss = max(rss)
    consolidate_s, consolidate_rss = _child(
        "from pathlib import Path; import torch; from safetensors.torch import load_file",
        f"files = sorted(Path({root!r}, 'sharded').glob('*.safetensors'))\n"
        "shards = [load_file(str(f)) for f in files]\n"
        "full = {}\n"
        "for k in shards[0]:\n"
        "    parts = [s[k] for s in shards if k in s]\n"
        "    full[k] = torch.cat(parts) if parts[0].dim() else parts[0]"
    )  # fmt: skip
    largest_unit = max(f.stat().st_size for f in (args.dir / "sliced").glob("unit_*"))
    loads = {
        world: run_distributed(load_both, world, args.model, root, world == 3, timeout_s=1800)[0]
        for world in (1, 3)
    }
    rows = [
        ("save 2 ranks", "save_sharded", saves["save_sharded_s"], "dcp.save",
         saves["dcp_save_s"]),
        ("reslice (sharded → slices)", "ckpt reslice", reslice_s, "raw copy + fsync", copy_s),
        ("reslice peak RSS", "ckpt reslice", reslice_rss, "load all + consolidate",
         consolidate_rss),
        ("load on 1 rank", "load_sliced", loads[1]["load_sliced_s"], "—", None),
        ("load on 3 ranks", "load_sliced", loads[3]["load_sliced_s"], "dcp.load (reshard)",
         loads[3]["dcp_load_s"]),
    ]  # fmt: skip
    table = Table(title=f"{args.model}: {shard_bytes / 2**30:.2f} GiB sharded state "
                  f"(parameters + momentum), 2 ranks, reslice rows: median of {args.repeat}"
                  )  # fmt: skip
    for col in ("what", "ours", "", "peer", " ", "ours ÷ peer"):
        table.add_column(col, justify="right" if col not in ("what",) else "left")
    for what, a, va, b, vb in rows:
        fmt = (lambda v: f"{v / 2**20:,.0f} MiB") if "RSS" in what else (lambda v: f"{v:.2f} s")
        table.add_row(what, a, fmt(va), b, fmt(vb) if vb is not None else "—",
                      f"{va / vb:.2f}" if vb else "—")  # fmt: skip
    report(table, args.out, {
        "model": args.model, "sharded_bytes": shard_bytes, "largest_unit_bytes": largest_unit,
        "save": saves, "raw_copy_s": copy_s, "reslice_s": reslice_s,
        "raw_copy_runs_s": copies, "reslice_runs_s": reslices, "reslice_runs_peak_rss": rss,
        "reslice_throughput_vs_copy": copy_s / reslice_s, "reslice_peak_rss": reslice_rss,
        "consolidate_s": consolidate_s, "consolidate_peak_rss": consolidate_rss,
        "rss_target": 2 * largest_unit + 300 * 2**20, "load": loads,
    })  # fmt: skip
    print(f"reslice throughput = {copy_s / reslice_s:.0%} of a raw copy (target ≥ 70%); peak "
          f"RSS {reslice_rss / 2**20:,.0f} MiB vs target {(2 * largest_unit) / 2**20 + 300:,.0f}"
          f" MiB (2 × largest unit + 300 MB)")  # fmt: skip
    rounds = [f"{c:.2f}/{t:.2f} = {c / t:.0%}" for c, t in zip(copies, reslices, strict=True)]
    print("rounds (raw copy s / reslice s = ratio): " + ", ".join(rounds))
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
