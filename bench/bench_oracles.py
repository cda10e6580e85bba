"""The planner's predictions against PyTorch's own memory trackers, in one run (issue 15).

Three tables, each ``predicted`` (planner.estimate / plan_checkpoints) against what a tracker
no one here wrote measures, with ``error = (predicted - measured) / measured`` (the standard
is 0 <= error <= +3%):

1. the corpus (tiny, the test ViT, transformers RegNet, ResNet, ConvNeXt, ViT, Swin at batch
   2): one process, FP32, no checkpointing, against ``MemTracker``; FSDP2 rank 0 (world size
   8; ConvNeXt and Swin 4), no checkpointing and units 0-1 checkpointed, against
   ``FSDPMemTracker`` (fake process group);
2. a transformers model with RegNetY-400MF's widths and depths at 224 px, batch 16 (the model
   the issue was found on): plans for 280 / 320 / 400 MiB in one process (``--no-fsdp
   --overhead 0``) measured by ``MemTracker``, and a plan for 300 MiB at world size 8 measured
   by ``FSDPMemTracker``;
3. any ``nn.Module``, no ModelSpec: ``fsdpkit plan --model examples.hf_vision:convnext_tiny
   (vit_base) --input 3x224x224 --batch 8 --no-fsdp --dtype fp32 --overhead 0``: the
   no-checkpointing prediction against ``MemTracker``;
4. what ``--verify`` adds: ``plan_checkpoints(verify=tracker)`` wall time beside the solver's.

Everything runs on fake tensors (no memory, no GPU). Usage::

    python bench/bench_oracles.py [--skip-400mf] [--out bench/results/oracles.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "tests")]

from _report import report  # noqa: E402
from rich.table import Table  # noqa: E402

from kitcore import get_model_spec  # noqa: E402
from planner import MemoryConfig, estimate, plan_checkpoints, profile_model  # noqa: E402
from planner.oracle import (  # noqa: E402
    fsdp_memtracker_peak,
    memtracker_peak,
    tracker_verifier,
)

MIB = 2**20


def _spec(name: str):
    if name == "tiny":
        return get_model_spec("tiny")
    if name == "toy-vit":
        import toy_models

        return toy_models.vit_spec()
    import oracle_models

    if name == "hf-regnet-y-400mf":
        return oracle_models.regnet_y_400mf(224)
    return oracle_models.HF_SPECS[name.removeprefix("hf-")]()


CORPUS = [("tiny", 8), ("toy-vit", 8), ("hf-regnet", 8), ("hf-resnet", 8),
          ("hf-convnext", 4), ("hf-vit", 8), ("hf-swin", 4)]  # fmt: skip


def _err(pred: int, meas: int) -> float:
    return (pred - meas) / meas


def corpus_rows(batch: int = 2) -> list[dict]:
    rows = []
    for name, world in CORPUS:
        spec = _spec(name)
        prof = profile_model(spec, batch)
        n = len(prof.units)
        plain = [(0, n, False)]
        pred1 = estimate(prof, plain, MemoryConfig()).peak_bytes
        meas1 = memtracker_peak(spec, batch, plain)
        row = {"model": name, "batch": batch, "world_size": world,
               "one_process": {"predicted": pred1, "memtracker": meas1,
                               "error": _err(pred1, meas1)}}  # fmt: skip
        cfg = MemoryConfig(world_size=world, sharded=True)
        for label, segs in (("plain", plain), ("0-1", [(0, 2, True), (2, n, False)])):
            pred = estimate(prof, segs, cfg).peak_bytes
            meas = fsdp_memtracker_peak(spec, batch, segs, world_size=world)
            row[f"fsdp_{label}"] = {"predicted": pred, "fsdp_memtracker": meas,
                                    "error": _err(pred, meas)}  # fmt: skip
        rows.append(row)
        print(f"{name}: done", flush=True)
    return rows


def rg400_rows(batch: int = 16) -> list[dict]:
    spec = _spec("hf-regnet-y-400mf")
    prof = profile_model(spec, batch)
    rows = []
    for mib, cfg in [(280, MemoryConfig()), (320, MemoryConfig()), (400, MemoryConfig()),
                     (300, MemoryConfig(world_size=8, sharded=True))]:  # fmt: skip
        plan = plan_checkpoints(prof, mib * MIB, cfg)
        if cfg.sharded:
            meas = fsdp_memtracker_peak(spec, batch, plan.segments, selective=plan.selective_spec,
                                        world_size=cfg.world_size)  # fmt: skip
        else:
            meas = memtracker_peak(spec, batch, plan.segments, selective=plan.selective_spec)
        rows.append({
            "budget_mib": mib, "world_size": cfg.world_size if cfg.sharded else 1,
            "fits": plan.fits, "predicted": plan.peak_bytes, "measured": meas,
            "tracker": "FSDPMemTracker" if cfg.sharded else "MemTracker",
            "error": _err(plan.peak_bytes, meas), "under_budget": meas <= mib * MIB,
            "segments": [list(s) for s in plan.segments], "selective": plan.selective_spec,
        })  # fmt: skip
        print(f"400MF {mib} MiB ws {rows[-1]['world_size']}: done", flush=True)
    return rows


def module_rows(batch: int = 8) -> list[dict]:
    rows = []
    for factory in ("convnext_tiny", "vit_base"):
        name = f"examples.hf_vision:{factory}"
        spec = get_model_spec(name, input_shape=(3, 224, 224))
        prof = profile_model(spec, batch)
        plain = [(0, len(prof.units), False)]
        pred = estimate(prof, plain, MemoryConfig()).peak_bytes
        meas = memtracker_peak(spec, batch, plain)
        rows.append({"model": name, "batch": batch, "units": len(prof.units), "predicted": pred,
                     "memtracker": meas, "error": _err(pred, meas)})  # fmt: skip
        print(f"{name}: done", flush=True)
    return rows


def verify_row() -> dict:
    """``fsdpkit plan --model tiny --batch 4 --world-size 8 --dtype bf16 --gpu-mem 60MiB
    --overhead 0 --verify`` as a library call: solver time without and with the tracker."""
    spec, cfg = _spec("tiny"), MemoryConfig(world_size=8, sharded=True)
    prof = profile_model(spec, 4, dtype="bf16")
    t0 = time.perf_counter()
    plain = plan_checkpoints(prof, 60 * MIB, cfg)
    solve_s = time.perf_counter() - t0
    verify, tracker = tracker_verifier(spec, 4, cfg, "bf16")
    checked = plan_checkpoints(prof, 60 * MIB, cfg, verify=verify)
    return {"model": "tiny", "batch": 4, "dtype": "bf16", "world_size": 8, "tracker": tracker,
            "solve_s": solve_s, "verify_time_s": checked.verify_time_s,
            "predicted": checked.peak_bytes, "verified": checked.verified_peak_bytes,
            "segments_unchanged": plain.segments == checked.segments}  # fmt: skip


def _pct(x: float) -> str:
    return f"{x:+.2%}"


def tables(corpus: list[dict], rg400: list[dict], modules: list[dict], ver: dict) -> Table:
    t = Table(title="planner vs PyTorch's trackers (bytes; error = predicted / measured - 1)")
    for col in ("case", "predicted", "measured", "tracker", "error"):
        t.add_column(col, justify="left" if col in ("case", "tracker") else "right")
    for r in corpus:
        o = r["one_process"]
        t.add_row(f"{r['model']} b{r['batch']} 1 process", f"{o['predicted']:,}",
                  f"{o['memtracker']:,}", "MemTracker", _pct(o["error"]))  # fmt: skip
        for k in ("plain", "0-1"):
            f = r[f"fsdp_{k}"]
            t.add_row(f"{r['model']} ws{r['world_size']} {k}", f"{f['predicted']:,}",
                      f"{f['fsdp_memtracker']:,}", "FSDPMemTracker", _pct(f["error"]))  # fmt: skip
    for r in rg400:
        fit = "fits" if r["under_budget"] else "OVER BUDGET"
        case = f"400MF b16 plan {r['budget_mib']} MiB ws{r['world_size']} ({fit})"
        meas = f"{r['measured']:,}"
        t.add_row(case, f"{r['predicted']:,}", meas, r["tracker"], _pct(r["error"]))
    for r in modules:
        case = f"{r['model']} 224 px b{r['batch']} ({r['units']} units found), 1 process"
        meas = f"{r['memtracker']:,}"
        t.add_row(case, f"{r['predicted']:,}", meas, "MemTracker", _pct(r["error"]))
    t.add_row(f"--verify (tiny bf16 ws8): solver {ver['solve_s']:.3f} s, tracker "
              f"{ver['verify_time_s']:.1f} s", f"{ver['predicted']:,}", f"{ver['verified']:,}",
              ver["tracker"], _pct(_err(ver["predicted"], ver["verified"])))  # fmt: skip
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-400mf", action="store_true", help="skip the 224 px model")
    parser.add_argument("--out", type=Path, default=Path("bench/results/oracles.json"))
    args = parser.parse_args()
    corpus = corpus_rows()
    rg400 = [] if args.skip_400mf else rg400_rows()
    modules = module_rows()
    ver = verify_row()
    data = {"corpus": corpus, "regnet_y_400mf": rg400, "any_module": modules, "verify": ver}
    report(tables(corpus, rg400, modules, ver), args.out, data)


if __name__ == "__main__":
    main()
