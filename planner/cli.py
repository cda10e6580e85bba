"""``fsdpkit plan`` and ``fsdpkit profile``: thin wrappers over :mod:`planner`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich import box
from rich.table import Table

from kitcore import FsdpkitError, FSDPPolicy, get_model_spec, parse_bytes, stdout_console
from kitcore import format_bytes as fb

from .advise import largest_batch
from .devices import DEFAULT_GPU, GPUS, get_device
from .memory import OPTIMIZERS, MemoryConfig, estimate
from .plot import plot_timelines, predicted_points
from .profile import DTYPES, ModelProfile, profile_model
from .solve import GRANULARITIES, OBJECTIVES, plan_checkpoints, world_size_needed

DEFAULT_GPU_MEM = 40 * 2**30


def default_gpu_mem() -> tuple[int, str]:
    """GPU 0's total memory from NVML, or 40 GiB (and a note saying so) without a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            total = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        finally:
            pynvml.nvmlShutdown()
        return int(total), f"GPU 0 ({name}) total, from NVML"
    except Exception:
        return DEFAULT_GPU_MEM, "no GPU found: 40 GiB assumed (set --gpu-mem)"


def _budget(args: argparse.Namespace) -> tuple[int, str]:
    if args.gpu_mem is not None:
        return parse_bytes(args.gpu_mem, "--gpu-mem"), "--gpu-mem"
    if getattr(args, "gpu", None):
        return get_device(args.gpu).memory_bytes, f"--gpu {args.gpu} memory"
    return default_gpu_mem()


def _profile(args: argparse.Namespace, device: str = "meta", selective: bool = True):

    if getattr(args, "profile", None):
        if args.model:
            raise FsdpkitError("give --model or --profile, not both")
        return None, ModelProfile.load(args.profile)
    if not args.model:
        raise FsdpkitError("--model is required (or --profile FILE)")
    if args.batch is None:
        raise FsdpkitError("--batch is required with --model")
    if args.batch < 1:
        raise FsdpkitError(f"--batch must be >= 1, got {args.batch}")
    spec = get_model_spec(args.model, input_shape=_shape(args.input), units=args.units)
    return spec, profile_model(
        spec, args.batch, device=device, dtype=args.dtype, selective=selective
    )


def _shape(text: str | None) -> tuple[int, ...] | None:
    """``"3x224x224"`` -> ``(3, 224, 224)``: one example's input shape, without the batch."""
    if text is None:
        return None
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise FsdpkitError(f"--input {text!r} is not a shape; use e.g. 3x224x224")
    return dims


def _config(args: argparse.Namespace, sharded: bool, overhead: bool = True):
    """The step the plan is for: with FSDP, read from the FSDPPolicy these flags make (the
    object training applies), so plan and run share one description."""

    extra = parse_bytes(args.overhead, "--overhead") if overhead else 0
    if not sharded:
        return MemoryConfig(optimizer=args.optimizer, overhead_bytes=extra)
    policy = FSDPPolicy(
        param_dtype=args.dtype, reduce_dtype=args.reduce_dtype, prefetch=args.prefetch,
        reshard_after_forward=not args.no_reshard_after_forward, batchnorm=args.batchnorm,
    )  # fmt: skip
    return MemoryConfig.from_policy(
        policy, args.world_size, optimizer=args.optimizer, overhead_bytes=extra
    )


def _units_table(plan, prof) -> Table:
    checkpointed = {i: k for k, (s, e, c) in enumerate(plan.segments) if c for i in range(s, e)}
    selective = dict(plan.selective_spec)
    table = Table(title=f"{prof.model}: units", box=box.SIMPLE_HEAD)
    for col in ("#", "unit", "kept for backward", "selective keeps", "output", "GFLOPs",
                "recompute"):  # fmt: skip
        table.add_column(col, justify="left" if col == "unit" else "right")
    for i, u in enumerate(prof.units):
        mark = f"segment {checkpointed[i]}" if i in checkpointed else ""
        if i in selective:  # a threshold: convolutions/products below it are recomputed too
            t = selective[i]
            mark = f"selective ≥{t:,.0f} FLOP/B" if t else "selective"
        sel = (
            fb(u.sel_terms(selective.get(i, 0.0)).saved_bytes + u.input_bytes)
            if u.has_selective
            else "-"
        )
        table.add_row(str(i), u.name, fb(u.activation_bytes), sel, fb(u.output_bytes),
                      f"{u.flops / 1e9:,.1f}", mark)  # fmt: skip
    return table


def _breakdown_table(plan) -> Table:
    table = Table(title="Per-rank memory at the peak", box=box.SIMPLE_HEAD)
    table.add_column("term")
    table.add_column("no checkpointing", justify="right")
    table.add_column(plan.objective, justify="right")
    keys = list(dict.fromkeys([*plan.breakdown_without_checkpointing, *plan.breakdown]))
    for k in keys:
        a, b = plan.breakdown_without_checkpointing.get(k, 0), plan.breakdown.get(k, 0)
        if a or b:
            table.add_row(k, fb(a), fb(b))
    table.add_row("[bold]peak[/bold]", fb(plan.peak_bytes_without_checkpointing),
                  f"[bold]{fb(plan.peak_bytes)}[/bold]")  # fmt: skip
    return table


def cmd_plan(args: argparse.Namespace) -> int:
    budget, budget_source = _budget(args)
    # whole-unit plans need no op-level selective passes: a faster profile
    spec, prof = _profile(args, selective=args.granularity != "unit")
    if prof.dtype in DTYPES:  # a saved profile was made in its own precision: plan for that
        args.dtype = prof.dtype
    cfg = _config(args, sharded=not args.no_fsdp)
    verify, tracker = None, None
    if args.verify:
        from .oracle import tracker_verifier  # the trackers run the wrapper, lazily

        if spec is None:
            raise FsdpkitError("--verify runs the model: give --model, not --profile")
        verify, tracker = tracker_verifier(spec, args.batch, cfg, args.dtype)
    plan = plan_checkpoints(
        prof, budget, cfg, objective=args.objective, segments=args.segments, verify=verify,
        granularity=args.granularity, device=args.gpu or DEFAULT_GPU,
    )  # fmt: skip
    out: dict[str, Any] = plan.to_json()
    out["budget_source"] = budget_source
    if tracker is not None:
        out["verification"] = {
            "tracker": tracker,
            "peak_bytes": plan.verified_peak_bytes,
            "time_s": plan.verify_time_s,
        }
    if not plan.fits:
        out["largest_batch_that_fits"] = largest_batch(prof, cfg, budget, spec)
        out["world_size_needed"] = world_size_needed(prof, cfg, budget) if cfg.sharded else None
    if args.save:
        plan.save(args.save)
    if args.plot:
        n = len(prof.units)
        plot_timelines(
            args.plot,
            {
                "no checkpointing": predicted_points(estimate(prof, [(0, n, False)], cfg).timeline),
                plan.objective: predicted_points(
                    estimate(prof, list(plan.segments), cfg, plan.selective_spec).timeline
                ),
            },
            title=f"{prof.model}, batch {prof.batch_size}, {prof.dtype}, world size "
            f"{cfg.world_size} (predicted)",
            budget_bytes=budget,
        )
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    console = stdout_console()
    console.print(_units_table(plan, prof))
    console.print(_breakdown_table(plan))
    where = "FSDP" if cfg.sharded else "one process"
    console.print(
        f"budget {fb(budget)} per rank ({budget_source}); {where}, world size "
        f"{cfg.world_size}, {prof.dtype}, optimizer {cfg.optimizer}, fixed overhead "
        f"{fb(cfg.overhead_bytes)}; solved in {plan.solver_time_s * 1e3:.0f} ms"
    )
    if tracker is not None:
        got = plan.verified_peak_bytes
        console.print(
            f"verified with {tracker} (symbolic, plus the fixed overhead): "
            + (f"peak {fb(got)}" if got is not None else "not run (the prediction does not fit)")
            + f"; verification took {plan.verify_time_s:.1f} s"
            + "".join(f"; {n}" for n in plan.notes)
        )
    verdict = "[green]fits[/green]" if plan.fits else "[red]does not fit[/red]"
    console.print(
        f"{verdict}: peak {fb(plan.peak_bytes)} (at {plan.peak_event}) of {fb(budget)}; "
        f"without checkpointing {fb(plan.peak_bytes_without_checkpointing)}; recomputes "
        f"{plan.recompute_fraction:.1%} of the step's FLOPs"
        + (
            f", {plan.recompute_time_fraction:.1%} of its roofline time on {plan.cost_device}"
            if plan.cost_device
            else ""
        )
        + f" ({len(plan.selective)} units selective, granularity {args.granularity})"
    )
    if not plan.fits:
        b, w = out["largest_batch_that_fits"], out["world_size_needed"]
        console.print(
            (f"largest batch that fits: {b}" if b else "no batch fits")
            + (f"; at batch {prof.batch_size}, world size >= {w} needed" if w else "")
        )
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .measure import measure_step  # runs the step: the wrapper's checkpointing, lazily

    spec, prof = _profile(args, device=args.device)
    out = prof.to_json()
    n = len(prof.units)
    cfg = _config(args, sharded=False, overhead=False)  # the step as measured: one process
    rows = []
    if args.device != "meta":  # predicted (symbolic) against measured (this device)
        _, sym = _profile(args, device="meta")
        for ps, pm in zip(sym.units, prof.units, strict=True):
            rows.append(
                (ps.name, ps.activation_bytes, pm.activation_bytes, ps.fwd_peak_bytes,
                 pm.fwd_peak_bytes, ps.bwd_peak_bytes, pm.bwd_peak_bytes)
            )  # fmt: skip
        predicted = estimate(sym, [(0, n, False)], cfg).peak_bytes
        step = measure_step(spec, args.batch, [(0, n, False)], device=args.device)
        out["comparison"] = {
            "predicted_peak_bytes": predicted,
            "measured_peak_bytes": step.peak_bytes,
            **step.extra,
        }
    if args.save:
        prof.save(args.save)
    if args.plot:
        budget, _ = _budget(args)
        plan = plan_checkpoints(prof, budget, cfg)
        series = {
            "no checkpointing (predicted)": predicted_points(
                estimate(prof, [(0, n, False)], cfg).timeline
            ),
            f"planned for {fb(budget)} (predicted)": predicted_points(
                estimate(prof, list(plan.segments), cfg, plan.selective_spec).timeline
            ),
        }
        if args.device == "cpu":
            for label, segs, sel in (
                ("no checkpointing", [(0, n, False)], ()),
                ("planned", plan.segments, plan.selective_spec),
            ):
                m = measure_step(spec, args.batch, segs, device="cpu", timeline=True, selective=sel)
                series[f"{label} (measured)"] = m.timeline
        plot_timelines(args.plot, series, title=f"{prof.model}, batch {prof.batch_size}, "
                       f"{prof.dtype}, one process", budget_bytes=budget)  # fmt: skip
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    console = stdout_console()
    table = Table(title=f"{prof.model}, batch {prof.batch_size}, {prof.dtype} on {prof.device}",
                  box=box.SIMPLE_HEAD)  # fmt: skip
    cols = ["#", "unit", "kept for backward", "output", "fwd peak", "bwd peak", "GFLOPs", "params"]
    for col in cols:
        table.add_column(col, justify="left" if col == "unit" else "right")
    for i, u in enumerate(prof.units):
        table.add_row(str(i), u.name, fb(u.activation_bytes), fb(u.output_bytes),
                      fb(u.fwd_peak_bytes), fb(u.bwd_peak_bytes), f"{u.flops / 1e9:,.2f}",
                      f"{u.param_numel:,}")  # fmt: skip
    console.print(table)
    console.print(
        f"static {fb(prof.static_bytes)}; plain step peak {fb(prof.measured_peak_bytes)}; "
        f"step {prof.step_flops / 1e9:,.1f} GFLOPs; profiled in {prof.profile_time_s:.2f} s"
    )
    if rows:
        cmp = Table(title="predicted (meta) vs measured", box=box.SIMPLE_HEAD)
        for col in ("unit", "kept pred", "kept meas", "fwd pred", "fwd meas", "bwd pred",
                    "bwd meas"):  # fmt: skip
            cmp.add_column(col, justify="left" if col == "unit" else "right")
        for r in rows:
            cmp.add_row(r[0], *(fb(x) for x in r[1:]))
        console.print(cmp)
        c = out["comparison"]
        err = (c["predicted_peak_bytes"] - c["measured_peak_bytes"]) / c["measured_peak_bytes"]
        extra = "".join(f"; {k.removesuffix('_bytes')} {fb(v)}" for k, v in c.items()
                        if k not in ("predicted_peak_bytes", "measured_peak_bytes"))  # fmt: skip
        console.print(
            f"step peak: predicted {fb(c['predicted_peak_bytes'])}, measured "
            f"{fb(c['measured_peak_bytes'])} ({err:+.2%}){extra}"
        )
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:

    def common(p: argparse.ArgumentParser, dtype: str) -> None:
        p.add_argument("--model", help="registered name or package.module:factory")
        p.add_argument(
            "--input",
            metavar="CxHxW",
            help="input shape of one example; then --model package.module:factory may "
            "return any nn.Module (its units are found automatically)",
        )
        p.add_argument("--units", metavar="GLOB", help="with --input: module names of the units")
        p.add_argument("--batch", type=int, help="per-rank batch size (images)")
        p.add_argument("--dtype", choices=list(DTYPES), default=dtype, help="training precision")
        p.add_argument("--gpu-mem", help="per-rank budget, e.g. 40GiB (default: NVML GPU 0)")
        p.add_argument("--world-size", type=int, default=8, help="data-parallel ranks")
        p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="sgd")
        p.add_argument("--prefetch", type=int, default=1, help="units all-gathered ahead")
        p.add_argument("--reduce-dtype", choices=list(DTYPES), default="fp32",
                       help="dtype of the gradient reduce-scatter")  # fmt: skip
        p.add_argument("--no-reshard-after-forward", action="store_true",
                       help="keep units gathered from forward to backward")  # fmt: skip
        p.add_argument("--batchnorm", choices=["auto", "replicate", "units"], default="auto",
                       help="FSDP's BatchNorm parameters (FSDPPolicy.batchnorm)")  # fmt: skip
        p.add_argument("--overhead", default="1GiB", help="fixed per-rank overhead (0: none)")
        p.add_argument("--save", metavar="FILE", help="write the result as JSON to FILE")
        p.add_argument("--plot", metavar="FILE", help="draw memory over a step (.png or .svg)")
        p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    p = sub.add_parser("plan", help="choose activation checkpoints that fit a memory budget")
    common(p, "fp16")
    p.add_argument("--objective", choices=OBJECTIVES, default="recompute")
    p.add_argument(
        "--gpu",
        choices=list(GPUS),
        help=f"price recomputation on this GPU's "
        f"roofline (default {DEFAULT_GPU}); its memory is then the default budget",
    )
    p.add_argument("--granularity", choices=GRANULARITIES, default="op",
                   help="op: per unit keep / selective / checkpointed segment; unit: whole-unit "
                   "segments only")  # fmt: skip
    p.add_argument("--segments", type=int, help="fixed number of min-max segments (study)")
    p.add_argument("--profile", metavar="FILE", help="plan from a saved profile, not a model")
    p.add_argument("--no-fsdp", action="store_true", help="plan one unsharded process")
    p.add_argument(
        "--verify",
        action="store_true",
        help="check the plan with PyTorch's memory tracker (symbolic) and re-plan until it fits",
    )
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("profile", help="per-unit activation memory and FLOPs of a step")
    common(p, "fp32")
    p.add_argument("--device", choices=["meta", "cpu", "cuda"], default="meta")
    p.set_defaults(func=cmd_profile)
