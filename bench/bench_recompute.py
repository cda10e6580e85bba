"""Activation recomputation side by side at equal measured peak memory (CPU, FP32, one process).

Per model (``tiny`` batch 8; transformers ``regnet``/``vit`` from ``tests/oracle_models.py``)
and per budget (60 % and 80 % of the way from the static floor to the plain predicted peak):

- ours, ``granularity="op"`` and ``"unit"``: ``plan_checkpoints(prof, budget, MemoryConfig())``;
  predicted peak, MemTracker peak (fake tensors), recompute FLOPs % of a step and the roofline
  recompute-time % (on ``--gpu``), measured CPU step time (median) and its ratio to plain;
- ``torch.compile`` with ``torch._functorch.config.activation_memory_budget`` swept over
  ``--compile-budgets``: the min-cut partitioner's fw/bw graphs are captured, recompute FLOPs =
  backward-graph FLOPs minus those at budget 1.0; bytes saved for backward by a pack hook
  around the compiled call; step time. ``--compile partition`` (default) runs the partitioned
  graphs eagerly (inductor's decompositions and partitioner, no C++ codegen: cold inductor
  compiles took 3-5 min per budget for tiny on 2 busy cores); ``--compile inductor`` compiles them;
- the one instrument all rows share: the allocator peak of one steady-state step (forward,
  backward, SGD step), from ``torch.profiler``'s ``[memory]`` events plus the bytes alive
  before the step. "at equal peak": per budget, the compile setting whose allocator peak
  fits with the fastest step;
- ``torch.distributed._tools.sac_ilp.sac_milp``: needs CUDA (its RuntimeEstimator); reported
  unavailable otherwise.

Then regnet10b (batch 16, fp16, FSDP policy on 8 ranks, 40 GiB), symbolic: op vs unit.

    python bench/bench_recompute.py [--quick] [--models tiny,regnet,vit] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from _report import report
from rich.table import Table
from torch.profiler import ProfilerActivity, profile
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import flop_registry

from kitcore import FSDPPolicy, get_model_spec
from planner import (
    MemoryConfig,
    UnitCosts,
    estimate,
    memtracker_peak,
    plan_checkpoints,
    profile_model,
    recompute_lower_bound,
    static_floor_bytes,
)
from planner._wrapper import apply_checkpointing
from planner.measure import sgd, training_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
GIB, MIB = 2**30, 2**20


def spec_for(name: str):
    if name == "tiny":
        return get_model_spec("tiny")
    from oracle_models import HF_SPECS

    return HF_SPECS[name]()


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


def eager_row(spec, batch, segments, selective, steps) -> dict:
    torch.manual_seed(0)
    model = spec.build_model(torch.device("cpu")).train()
    apply_checkpointing(spec, model, segments, selective)
    opt = sgd(model, 1e-5)
    inputs = spec.example_input(batch, torch.device("cpu"))
    return measure(training_step(spec, model, opt, inputs), model, opt, inputs, steps)


def graph_flops(gm: torch.fx.GraphModule) -> int:
    total = 0
    for n in gm.graph.nodes:
        pkt = getattr(n.target, "_overloadpacket", None) if n.op == "call_function" else None
        if pkt in flop_registry and "val" in n.meta:
            args, kwargs = tree_map(
                lambda v: v.meta.get("val") if isinstance(v, torch.fx.Node) else v,
                (n.args, n.kwargs),
            )
            total += flop_registry[pkt](*args, **kwargs, out_val=n.meta["val"])
    return total


def make_backend(kind: str, graphs: dict):
    def record(gm, backward: bool) -> None:
        graphs["bw" if backward else "fw"] += graph_flops(gm)

    if kind == "inductor":
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def inner(gm, inputs, **kw):
            record(gm, bool(kw.get("is_backward")))
            return compile_fx_inner(gm, inputs, **kw)

        return lambda gm, ex: compile_fx(gm, ex, inner_compile=inner)
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    def compiler(backward: bool):
        def comp(gm, _inputs):
            record(gm, backward)
            return make_boxed_func(gm.forward)

        return comp

    return aot_autograd(
        fw_compiler=compiler(False), bw_compiler=compiler(True),
        partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table(),
    )  # fmt: skip


def compile_row(spec, batch, act_budget: float, kind: str, steps: int) -> dict:
    import torch._functorch.config as fcfg

    torch._dynamo.reset()
    fcfg.activation_memory_budget = act_budget
    fcfg.enable_autograd_cache = False  # the partition must run, so its graphs are seen
    graphs = {"fw": 0, "bw": 0}
    torch.manual_seed(0)
    model = spec.build_model(torch.device("cpu")).train()
    opt = sgd(model, 1e-5)
    inputs = spec.example_input(batch, torch.device("cpu"))
    compiled = torch.compile(model, backend=make_backend(kind, graphs))
    step = training_step(spec, compiled, opt, inputs)
    t = time.perf_counter()
    step()  # compiles forward and backward
    compile_s = time.perf_counter() - t
    saved: dict[int, int] = {}

    def pack(x):
        saved[x.untyped_storage()._cdata] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = spec.training_loss(compiled(inputs))
    loss.backward()
    opt.zero_grad(set_to_none=True)
    del loss
    row = measure(step, model, opt, inputs, steps)
    fcfg.activation_memory_budget = 1.0
    return {"method": f"compile amb={act_budget:g}", "activation_memory_budget":
            act_budget, "compile_s": compile_s, "saved_bytes": sum(saved.values()),
            "fw_flops": graphs["fw"], "bw_flops": graphs["bw"], **row}  # fmt: skip


def sac_ilp_status(spec, batch, budget) -> dict:
    """``sac_milp`` needs SACEstimator/RuntimeEstimator stats, which need CUDA."""
    try:
        import pulp  # noqa: F401
    except ImportError:
        return {"method": "sac_ilp", "status": "unavailable: pulp not installed"}
    if not torch.cuda.is_available():
        return {"method": "sac_ilp", "status": "unavailable: needs CUDA (RuntimeEstimator and "
                "SACEstimator (roofline asserts torch.cuda.is_available(); "
                "benchmark mode times with CUDA events); this run is CPU-only"}  # fmt: skip
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools import MemTracker, RuntimeEstimator, SACEstimator
    from torch.distributed._tools.ilp_utils import (
        aggregate_stats,
        get_peak_memory_runtime_baseline,
        parse_module_info,
    )
    from torch.distributed._tools.sac_ilp import sac_milp

    mode, dev = "operator-level-cost-model", torch.device("cuda")
    with FakeTensorMode():
        model = spec.build_model(dev).train()
        opt, x = sgd(model, 1e-5), spec.example_input(batch, dev)
        step = training_step(spec, model, opt, x)
        step()
        mt = MemTracker()
        mt.track_external(model, opt)
        with mt:
            step()
        rt = RuntimeEstimator()
        with rt(estimate_mode_type=mode):
            step()
        sac = SACEstimator()
        with sac(estimate_mode_type=mode):
            loss = spec.training_loss(model(x))
        loss.backward()
        graph = parse_module_info(aggregate_stats(model, mt, rt, sac, dev))
    _, compute_ms = get_peak_memory_runtime_baseline(graph)
    decisions, recompute_ms, peak = sac_milp(graph, memory_budget=budget / GIB)
    frac = recompute_ms / compute_ms if compute_ms else 0.0
    return {"method": "sac_ilp", "status": "ILP solved (not applied: no applier here)",
            "decisions": decisions, "ilp_peak_bytes": peak,
            "recompute_time_fraction": frac}  # fmt: skip


def run_model(name: str, batch: int, fractions, act_budgets, kind: str, steps: int, gpu: str):
    spec = spec_for(name)
    prof, cfg = profile_model(spec, batch), MemoryConfig()
    n = len(prof.units)
    floor = static_floor_bytes(prof, cfg)
    plain_pred = estimate(prof, [(0, n, False)], cfg).peak_bytes
    plain = {"method": "plain (no checkpointing)", "predicted_bytes": plain_pred,
             "memtracker_bytes": memtracker_peak(spec, batch, [(0, n, False)]),
             **eager_row(spec, batch, [(0, n, False)], (), steps)}  # fmt: skip
    sweep = sorted({1.0, *act_budgets}, reverse=True)
    compiled = [compile_row(spec, batch, b, kind, steps) for b in sweep]
    ref = next(c for c in compiled if c["activation_memory_budget"] == 1.0)
    step_flops = ref["fw_flops"] + ref["bw_flops"]
    for c in compiled:
        c["recompute_flops"] = c["bw_flops"] - ref["bw_flops"]
        c["recompute_fraction"] = c["recompute_flops"] / step_flops if step_flops else 0.0
        c["step_ratio"] = c["step_s"] / plain["step_s"]
    budgets = []
    for frac in fractions:
        budget = int(floor + frac * (plain_pred - floor))
        rows = []
        for gran in ("op", "unit"):
            plan = plan_checkpoints(prof, budget, cfg, granularity=gran, device=gpu)
            row = eager_row(spec, batch, plan.segments, plan.selective, steps)
            rows.append({
                "method": f"ours ({gran})", "predicted_bytes": plan.peak_bytes,
                "memtracker_bytes": memtracker_peak(spec, batch, plan.segments,
                                                    selective=plan.selective),
                "recompute_flops": plan.recompute_flops,
                "recompute_fraction": plan.recompute_fraction,
                "recompute_time_fraction": plan.recompute_time_fraction,
                "choices": plan.choices(), "segments": [list(s) for s in plan.segments],
                "selective": list(plan.selective), "fits_predicted": plan.fits,
                **row, "step_ratio": row["step_s"] / plain["step_s"],
            })  # fmt: skip
        fitting = [c for c in compiled if c["alloc_peak_bytes"] <= budget]
        best = min(fitting, key=lambda c: c["step_s"]) if fitting else None
        rows.append(dict(best) if best else {"method": "compile: no setting fits"})
        rows.append(sac_ilp_status(spec, batch, budget))
        budgets.append({"fraction": frac, "budget_bytes": budget, "rows": rows})
    return {"model": name, "batch": batch, "units": n, "floor_bytes": floor, "plain": plain,
            "compile_sweep": compiled, "budgets": budgets}  # fmt: skip


def regnet10b(gpu: str) -> dict:
    prof = profile_model(get_model_spec("regnet10b"), 16, dtype="fp16")
    cfg = MemoryConfig.from_policy(FSDPPolicy(param_dtype="fp16"), 8)
    out = {"budget_bytes": 40 * GIB}
    for gran in ("op", "unit"):
        p = plan_checkpoints(prof, 40 * GIB, cfg, granularity=gran, device=gpu)
        out[gran] = {"recompute_time_fraction": p.recompute_time_fraction,
                     "recompute_fraction": p.recompute_fraction, "peak_bytes": p.peak_bytes,
                     "fits": p.fits, "selective": list(p.selective),
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
              "alloc peak = torch.profiler allocator peak of one step")  # fmt: skip
    cols = ("model", "budget", "method", "pred", "MemTrk", "alloc", "saved", "FLOPs",
            "t roof", "ms", "×plain", "note")  # fmt: skip
    for c in cols:
        t.add_column(c, justify="left" if c in ("model", "method", "note") else "right",
                     no_wrap=c != "note")  # fmt: skip

    def add(model, budget, r):
        note = "".join(x[0] for x in r["choices"]) if "choices" in r else r.get("status", "")
        note = note.split(" (")[0] + ("" if r.get("fits_predicted", True) else " over budget")
        if "compile_s" in r:
            note = f"compile {r['compile_s']:.0f} s"
        step = r.get("step_s")
        t.add_row(model, budget, r["method"], mib(r.get("predicted_bytes")),
                  mib(r.get("memtracker_bytes")), mib(r.get("alloc_peak_bytes")),
                  mib(r.get("saved_bytes")), pct(r.get("recompute_fraction")),
                  pct(r.get("recompute_time_fraction")),
                  "-" if step is None else f"{step * 1e3:,.0f}",
                  "-" if "step_ratio" not in r else f"{r['step_ratio']:.2f}",
                  note[:36])  # fmt: skip

    for res in results:
        m = f"{res['model']} b{res['batch']}"
        add(m, "-", {**res["plain"], "method": "plain", "step_ratio": 1.0})
        for c in res["compile_sweep"]:
            add(m, "sweep", c)
        for b in res["budgets"]:
            for r in b["rows"]:
                add(m, f"{b['fraction']:.0%} {b['budget_bytes'] / MIB:,.2f}", r)
        t.add_section()
    for gran in ("op", "unit"):
        g = big[gran]
        t.add_row("regnet10b b16", "40 GiB", f"ours ({gran})",
                  f"{g['peak_bytes'] / GIB:.1f} GiB", "-", "-", "-",
                  pct(g["recompute_fraction"]), pct(g["recompute_time_fraction"]), "-", "-",
                  "fits" if g["fits"] else "does not fit")  # fmt: skip
        t.add_row("regnet10b b16", "40 GiB", f"lower bound ({gran})", "", "", "", "", "",
                  pct(g["lower_bound_time_fraction"]), "", "", "no plan of these choices "
                  "recomputes less")  # fmt: skip
    ratio = big["op_over_unit_time"]
    t.add_row("regnet10b", "", "op/unit recompute time", "", "", "", "", "",
              "-" if ratio is None else f"{ratio:.2f}", "", "", "target ≤ 0.5")  # fmt: skip
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny only, budget 60%%, compile budgets 1.0, 0.5")  # fmt: skip
    parser.add_argument("--models", default=None, help="comma list of tiny,regnet,vit")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--compile", choices=("partition", "inductor"), default="partition")
    parser.add_argument("--compile-budgets", default=None, help="e.g. 1.0,0.5,0.3")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--gpu", default="h100-80gb", help="roofline device for ours")
    parser.add_argument("--out", "--json", dest="out", type=Path,
                        default=Path("bench/results/recompute.json"))  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = (args.models or ("tiny" if args.quick else "tiny,regnet,vit")).split(",")
    fractions = (0.6,) if args.quick else (0.6, 0.8)
    default_amb = "1.0,0.5" if args.quick else "1.0,0.5,0.3,0.1"
    act_budgets = [float(x) for x in (args.compile_budgets or default_amb).split(",")]
    steps = args.steps or (2 if args.quick else 3)
    t0 = time.perf_counter()
    results = [
        run_model(m, args.batch, fractions, act_budgets, args.compile, steps, args.gpu)
        for m in models
    ]
    big = regnet10b(args.gpu)
    data = {"command": " ".join(sys.argv), "compile_backend": args.compile, "threads":
            args.threads, "steps": steps, "models": results, "regnet10b": big,
            "wall_s": time.perf_counter() - t0}  # fmt: skip
    report(table(results, big, args.compile), args.out, data)


if __name__ == "__main__":
    main()
