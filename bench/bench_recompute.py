"""Activation recomputation side by side at equal measured peak memory (CPU, FP32, one process).

Per model (``tiny`` batch 8; transformers ``regnet``/``vit`` from ``tests/oracle_models.py``):

- plain: no checkpointing;
- peers, each swept over its own knob: ``torch.compile`` with
  ``torch._functorch.config.activation_memory_budget`` (``_compile_peer.py``), and
  ``torch.distributed._tools.sac_ilp`` (``_sac_ilp.py``: torch's estimators and MILPs, applied
  per operator through ``torch.utils.checkpoint``; needs ``pulp`` and ``pwlf``);
- budgets: 60 % and 80 % of the way from the static floor to the plain predicted peak, and
  *each peer setting's own measured peak*. At each, ours at ``granularity="op"`` and
  ``"unit"`` (``plan_checkpoints``, re-planned tighter until its measured peak fits), and the
  best setting of each peer that fits (least roofline time);
- one instrument for all rows (``_roofline.py``): the allocator peak of one steady-state step
  (forward, backward, SGD step) from ``torch.profiler``'s ``[memory]`` events plus the bytes
  alive before it; the FLOPs and roofline time (``--gpu``) of the operators each step really
  runs, recomputation included, minus those of its reference step; CPU step time (median).

Then regnet10b (batch 16, fp16, FSDP policy on 8 ranks, 40 GiB), symbolic: op vs unit, each
plan's peak against ``FSDPMemTracker`` (rank 0 of 8 on fake tensors, ~45 s a plan), and the
lower bound of :func:`planner.recompute_lower_bound`.

    python bench/bench_recompute.py [--quick] [--models tiny,regnet,vit] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import _sac_ilp
import torch
from _compile_peer import compile_row
from _report import report
from _roofline import count_step
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile
from torch.utils._pytree import tree_leaves

from kitcore import FsdpkitError, FSDPPolicy, get_model_spec
from planner import (
    MemoryConfig,
    UnitCosts,
    estimate,
    fsdp_memtracker_peak,
    memtracker_peak,
    plan_checkpoints,
    profile_model,
    recompute_lower_bound,
    static_floor_bytes,
)
from planner._wrapper import apply_checkpointing
from planner.devices import get_device
from planner.measure import sgd, training_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
GIB, MIB = 2**30, 2**20


def spec_for(name: str):
    """transformers' ``regnet``/``vit``/... from ``tests/oracle_models.py``, else a registry
    name (``tiny``, ``rg8gf``)."""
    from oracle_models import HF_SPECS

    return HF_SPECS[name]() if name in HF_SPECS else get_model_spec(name)


def static_bytes(model, opt, inputs) -> int:
    """Bytes alive before a step: parameters, buffers, inputs, optimizer state."""
    state = [t for st in opt.state.values() for t in tree_leaves(st) if torch.is_tensor(t)]
    seen = {}
    for t in [*model.parameters(), *model.buffers(), *tree_leaves(inputs), *state]:
        if torch.is_tensor(t):
            st = t.untyped_storage()
            seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def measure(step, model, opt, inputs, steps: int) -> dict:
    """Warm up, then the allocator peak of one profiled step and the median of ``steps``."""
    step()
    base = static_bytes(model, opt, inputs)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in p.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )  # fmt: skip
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"alloc_peak_bytes": base + peak, "step_s": statistics.median(times)}


def eager_row(spec, batch, apply, steps, device) -> dict:
    """Allocator peak, step time, and (a further step) FLOPs and roofline time of an eager
    step of ``spec`` after ``apply(model)``."""
    torch.manual_seed(0)
    model = spec.build_model(torch.device("cpu")).train()
    apply(model)
    opt = sgd(model, 1e-5)
    inputs = spec.example_input(batch, torch.device("cpu"))
    step = training_step(spec, model, opt, inputs)
    return {**measure(step, model, opt, inputs, steps), **count_step(step, device)}


def ours(spec, segments, selective):
    return lambda model: apply_checkpointing(spec, model, segments, selective)


def relative(row: dict, ref: dict) -> dict:
    """Recompute = this row's counted step minus its reference's (same instrument)."""
    extra_s = row["roofline_s"] - ref["roofline_s"]
    return {**row, "recompute_flops": row["flops"] - ref["flops"],
            "recompute_fraction": (row["flops"] - ref["flops"]) / ref["flops"],
            "recompute_time_fraction": extra_s / ref["roofline_s"],
            "step_ratio": row["step_s"] / ref["plain_step_s"]}  # fmt: skip


def sac_sweep(spec, batch, fractions, steps, device, plain) -> tuple[list[dict], dict]:
    """``sac_ilp`` at ``fractions`` of its own plain-peak model, each answer applied and run."""
    try:
        import pulp  # noqa: F401
        import pwlf  # noqa: F401
    except ImportError as e:
        return [], {"status": f"unavailable: {e.name} not installed (pip install pulp pwlf)"}
    t = time.perf_counter()
    stats = _sac_ilp.collect(spec, batch, device)
    info = {"status": "run", "collect_s": time.perf_counter() - t,
            "baseline_peak_bytes": stats.baseline_peak_bytes}  # fmt: skip
    rows = []
    for f in fractions:
        policies = _sac_ilp.solve(stats, int(f * stats.baseline_peak_bytes))
        if policies is None:
            rows.append({"method": f"sac_ilp {f:g}", "status": "no MILP solution"})
            continue
        row = eager_row(spec, batch, lambda m, p=policies: _sac_ilp.apply(m, p), steps, device)
        rows.append(relative({"method": f"sac_ilp {f:g}", "sac_budget_fraction": f,
                              "kept_ops": {k: f"{sum(v)}/{len(v)}" for k, v in
                                           policies.items()}, **row}, plain))  # fmt: skip
    return rows, info


def ours_at(spec, prof, cfg, budget, batch, steps, device, plain) -> list[dict]:
    """Our op- and unit-granularity plans at ``budget`` (planner bytes, equal to MemTracker's),
    tightened until the allocator's measured peak is within ``budget`` too."""
    rows = []
    for gran in ("op", "unit"):
        target, plan, row = budget, None, None
        for k in range(6):
            try:
                found = plan_checkpoints(prof, target, cfg, granularity=gran, device=device.name)
            except FsdpkitError:  # tightened below the static floor: keep the last plan
                break
            plan = found
            apply = ours(spec, plan.segments, plan.selective_spec)
            row = eager_row(spec, batch, apply, steps, device)
            over = row["alloc_peak_bytes"] - budget
            if over <= 0 or not plan.fits:
                break
            # what the allocator counts beyond the model (CPU convolution scratch) may be
            # less than the next plan down frees: each retry cuts twice as deep
            target -= over << k
        rows.append(relative({
            "method": f"ours ({gran})", "predicted_bytes": plan.peak_bytes,
            "memtracker_bytes": memtracker_peak(spec, batch, plan.segments,
                                                selective=plan.selective_spec),
            "planned_recompute_time_fraction": plan.recompute_time_fraction,
            "choices": plan.choices(), "segments": [list(s) for s in plan.segments],
            "selective": plan.selective_spec, "fits_predicted": plan.fits, **row,
        }, plain))  # fmt: skip
    return rows


def best_fitting(rows: list[dict], budget: int) -> dict | None:
    """The peer setting that fits ``budget`` (allocator peak) with the least roofline time."""
    fitting = [r for r in rows if "alloc_peak_bytes" in r and r["alloc_peak_bytes"] <= budget]
    return min(fitting, key=lambda r: r["roofline_s"]) if fitting else None


def run_model(name, batch, fractions, act_budgets, sac_fractions, kind, steps, device):
    spec = spec_for(name)
    prof, cfg = profile_model(spec, batch), MemoryConfig()
    n = len(prof.units)
    floor = static_floor_bytes(prof, cfg)
    plain_pred = estimate(prof, [(0, n, False)], cfg).peak_bytes
    plain = eager_row(spec, batch, lambda m: None, steps, device)
    plain = {"method": "plain (no checkpointing)", "predicted_bytes": plain_pred,
             "memtracker_bytes": memtracker_peak(spec, batch, [(0, n, False)]), **plain,
             "plain_step_s": plain["step_s"]}  # fmt: skip

    def measured(step, model, opt, inputs):
        return measure(step, model, opt, inputs, steps)

    sweep = sorted({1.0, *act_budgets}, reverse=True)
    compiled = [compile_row(spec, batch, b, kind, measured, device) for b in sweep]
    ref = next(c for c in compiled if c["activation_memory_budget"] == 1.0)
    ref = {**ref, "plain_step_s": plain["step_s"]}
    compiled = [relative(c, ref) for c in compiled]
    sac_rows, sac_info = sac_sweep(spec, batch, sac_fractions, steps, device, plain)
    # budgets: fixed shares of the way from the static floor to the plain peak, then each
    # peer setting's own measured peak, so every peer is met where it actually lands
    targets = [(f"{f:.0%}", int(floor + f * (plain_pred - floor))) for f in fractions]
    targets += [(r["method"], r["alloc_peak_bytes"]) for r in (*compiled, *sac_rows)
                if r.get("alloc_peak_bytes", plain["alloc_peak_bytes"])
                < plain["alloc_peak_bytes"]]  # fmt: skip
    budgets = []
    for label, budget in targets:
        rows = ours_at(spec, prof, cfg, budget, batch, steps, device, plain)
        for peer, sweep_rows in (("compile", compiled), ("sac_ilp", sac_rows)):
            best = best_fitting(sweep_rows, budget)
            rows.append(dict(best) if best else {"method": f"{peer}: no setting fits"})
        budgets.append({"label": label, "budget_bytes": budget, "rows": rows})
    return {"model": name, "batch": batch, "units": n, "floor_bytes": floor, "plain": plain,
            "compile_sweep": compiled, "sac_ilp": sac_info, "sac_sweep": sac_rows,
            "budgets": budgets}  # fmt: skip


def regnet10b(gpu: str) -> dict:
    spec = get_model_spec("regnet10b")
    prof = profile_model(spec, 16, dtype="fp16")
    cfg = MemoryConfig.from_policy(FSDPPolicy(param_dtype="fp16"), 8)
    out = {"budget_bytes": 40 * GIB}
    for gran in ("op", "unit"):
        p = plan_checkpoints(prof, 40 * GIB, cfg, granularity=gran, device=gpu)
        # the plan as FSDP2 trains it, rank 0 of 8 on fake tensors, by PyTorch's tracker
        tracked = fsdp_memtracker_peak(spec, 16, p.segments, selective=p.selective_spec,
                                       world_size=8, dtype="fp16")  # fmt: skip
        out[gran] = {"recompute_time_fraction": p.recompute_time_fraction,
                     "recompute_fraction": p.recompute_fraction, "peak_bytes": p.peak_bytes,
                     "fsdpmemtracker_bytes": tracked,
                     "tracker_error": (p.peak_bytes - tracked) / tracked,
                     "fits": p.fits, "selective": p.selective_spec,
                     "segments": [list(s) for s in p.segments]}  # fmt: skip
    unit_t = out["unit"]["recompute_time_fraction"]
    out["op_over_unit_time"] = out["op"]["recompute_time_fraction"] / unit_t if unit_t else None
    # how little any plan of these choices could recompute (planner.bound), as a fraction of
    # the step's roofline time
    costs, step = UnitCosts.roofline(prof, gpu), prof.step_time_s[gpu]
    for gran, sel in (("op", True), ("unit", False)):
        bound = recompute_lower_bound(prof, 40 * GIB, cfg, costs, selective=sel)
        out[gran]["lower_bound_time_fraction"] = None if bound is None else bound / step
    return out


def mib(b) -> str:
    return "-" if b is None else f"{b / MIB:,.2f}"


def pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def table(results: list[dict], big: dict, kind: str) -> Table:
    t = Table(title=f"Recomputation at equal peak (CPU FP32; compile backend: {kind}); MiB; "
              "alloc = allocator peak of one step; FLOPs+ and t roof+ = extra over the "
              "reference step, counted as run")  # fmt: skip
    cols = ("model", "budget", "method", "pred", "MemTrk", "alloc", "FLOPs+", "t roof+", "ms",
            "×plain", "note")  # fmt: skip
    for c in cols:
        t.add_column(c, justify="left" if c in ("model", "method", "note") else "right",
                     no_wrap=c != "note")  # fmt: skip

    def add(model, budget, r):
        note = "".join(x[0] for x in r["choices"]) if "choices" in r else r.get("status", "")
        note = note.split(" (")[0] + ("" if r.get("fits_predicted", True) else " over budget")
        if "compile_s" in r:
            note = f"compile {r['compile_s']:.0f} s"
        if "kept_ops" in r:
            note = " ".join(f"{k.split('.')[-1]}:{v}" for k, v in r["kept_ops"].items())
        step = r.get("step_s")
        t.add_row(model, budget, r["method"], mib(r.get("predicted_bytes")),
                  mib(r.get("memtracker_bytes")), mib(r.get("alloc_peak_bytes")),
                  pct(r.get("recompute_fraction")), pct(r.get("recompute_time_fraction")),
                  "-" if step is None else f"{step * 1e3:,.0f}",
                  "-" if "step_ratio" not in r else f"{r['step_ratio']:.2f}",
                  note[:40])  # fmt: skip

    for res in results:
        m = f"{res['model']} b{res['batch']}"
        add(m, "-", {**res["plain"], "method": "plain", "step_ratio": 1.0})
        for c in (*res["compile_sweep"], *res["sac_sweep"]):
            add(m, "sweep", c)
        if res["sac_ilp"]["status"] != "run":
            add(m, "sweep", {"method": "sac_ilp", "status": res["sac_ilp"]["status"]})
        for b in res["budgets"]:
            for r in b["rows"]:
                add(m, f"{b['label']} {b['budget_bytes'] / MIB:,.2f}", r)
        t.add_section()
    for gran in ("op", "unit"):
        g = big[gran]
        t.add_row("regnet10b b16", "40 GiB", f"ours ({gran})",
                  f"{g['peak_bytes'] / GIB:.2f} GiB", f"{g['fsdpmemtracker_bytes'] / GIB:.2f} GiB",
                  "-", pct(g["recompute_fraction"]), pct(g["recompute_time_fraction"]), "-", "-",
                  ("fits" if g["fits"] else "does not fit")
                  + f"; FSDPMemTracker {100 * g['tracker_error']:+.2f}%")  # fmt: skip
        t.add_row("regnet10b b16", "40 GiB", f"lower bound ({gran})", "", "", "", "",
                  pct(g["lower_bound_time_fraction"]), "", "", "no plan of these choices "
                  "recomputes less")  # fmt: skip
    ratio = big["op_over_unit_time"]
    t.add_row("regnet10b", "", "op/unit recompute time", "", "", "", "",
              "-" if ratio is None else f"{ratio:.2f}", "", "", "target ≤ 0.5")  # fmt: skip
    return t


def head_to_head(results: list[dict]) -> list[dict]:
    """At each peer setting's own measured peak: its extra roofline time against ours."""
    out = []
    for res in results:
        for b in res["budgets"]:
            rows = {r["method"]: r for r in b["rows"]}
            peer = rows.get(b["label"])
            if peer is None:  # a fixed-share budget, not a peer's peak
                continue
            op, unit = rows["ours (op)"], rows["ours (unit)"]
            out.append({"model": res["model"], "peer": b["label"], "peak_bytes": b["budget_bytes"],
                        "peer_time_fraction": peer["recompute_time_fraction"],
                        "op_time_fraction": op["recompute_time_fraction"],
                        "unit_time_fraction": unit["recompute_time_fraction"],
                        "op_peak_bytes": op["alloc_peak_bytes"],
                        "peer_step_ratio": peer["step_ratio"], "op_step_ratio": op["step_ratio"],
                        "op_fits": op["alloc_peak_bytes"] <= b["budget_bytes"]})  # fmt: skip
    return out


def summary(h2h: list[dict]) -> Table:
    t = Table(title="At each peer setting's own measured peak: extra roofline time, % of the step")
    for c in ("model", "peer setting", "peak MiB", "peer", "ours op", "ours unit",
              "ours op peak", "CPU ×plain peer / ours"):  # fmt: skip
        t.add_column(c, justify="left" if c in ("model", "peer setting") else "right")
    for h in h2h:
        t.add_row(h["model"], h["peer"], mib(h["peak_bytes"]), pct(h["peer_time_fraction"]),
                  pct(h["op_time_fraction"]), pct(h["unit_time_fraction"]),
                  mib(h["op_peak_bytes"]) + ("" if h["op_fits"] else " over"),
                  f"{h['peer_step_ratio']:.2f} / {h['op_step_ratio']:.2f}")  # fmt: skip
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny only, budget 60%%, compile budgets 1.0, 0.5")  # fmt: skip
    parser.add_argument("--models", default=None,
                        help="comma list of tiny,regnet,vit (default), rg8gf, ...")  # fmt: skip
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--compile", choices=("partition", "inductor"), default="partition")
    parser.add_argument("--compile-budgets", default=None, help="e.g. 1.0,0.5,0.3")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--sac-fractions",
        default=None,
        help="sac_ilp budgets as shares of its own plain-peak model",
    )
    parser.add_argument("--gpu", default="h100-80gb", help="roofline device (all rows)")
    parser.add_argument("--out", "--json", dest="out", type=Path,
                        default=Path("bench/results/recompute.json"))  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = (args.models or ("tiny" if args.quick else "tiny,regnet,vit")).split(",")
    fractions = (0.6,) if args.quick else (0.6, 0.8)
    default_amb = "1.0,0.5" if args.quick else "1.0,0.5,0.3,0.1"
    act_budgets = [float(x) for x in (args.compile_budgets or default_amb).split(",")]
    default_sac = "1.0,0.8" if args.quick else "1.0,0.9,0.8,0.7,0.6,0.5"
    sac_fractions = [float(x) for x in (args.sac_fractions or default_sac).split(",")]
    steps = args.steps or (2 if args.quick else 3)
    device = get_device(args.gpu)
    t0 = time.perf_counter()
    results = [
        run_model(m, args.batch, fractions, act_budgets, sac_fractions, args.compile, steps,
                  device)
        for m in models
    ]  # fmt: skip
    big = regnet10b(args.gpu)
    h2h = head_to_head(results)
    data = {"command": " ".join(sys.argv), "compile_backend": args.compile, "threads":
            args.threads, "steps": steps, "gpu": args.gpu, "models": results,
            "head_to_head": h2h, "regnet10b": big,
            "wall_s": time.perf_counter() - t0}  # fmt: skip
    Console(width=150).print(summary(h2h))
    report(table(results, big, args.compile), args.out, data)


if __name__ == "__main__":
    main()
