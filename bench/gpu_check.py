"""Every GPU memory check the project has, in one run (<= 8 minutes on one GPU); writes JSON.

Per model (rg8gf, rg32gf, a ``transformers`` RegNetY-400MF-shaped model) and per plan (no
checkpointing; the planner's plans for a budget 30% of the way down from that peak to the
static floor, with whole-unit segments and with op-level selective checkpointing): the
predicted peak of one FP32 process (symbolic, on meta) against
``torch.cuda.max_memory_allocated`` and NVML's used memory over a real steady-state step
(:func:`planner.measure_step`), plus ``MemTracker``'s symbolic figure; and the measured step
time (median of 5 after a warm-up) beside the plan's roofline recompute-time fraction, so the
time model can be checked against the device. Error = (predicted - measured) / measured; the
planner's standard is [0, +3%] against the allocator.

BatchNorm in FP16/BF16 (:func:`bn_rows`), per path: torch's kernel (what a group of one runs),
``BatchNormFn`` on torch's fused sync-BN kernels (CUDA: what a synchronised group runs there)
and on its composed ops (what a synchronised group runs on CPU): error against float64 over
the noise floor, bytes saved for backward over the input's, and the peak allocated above the
start through forward and backward.

    python bench/gpu_check.py [--out bench/results/gpu_check.json] [--budget-s 480]
    python bench/gpu_check.py --dry-run     # no GPU: small models, real CPU tensors (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "tests")]

from _report import report  # noqa: E402

from fsdpkit import ModelSpec, get_model_spec  # noqa: E402
from planner import MemoryConfig, estimate, measure_step, plan_checkpoints, profile_model  # noqa: E402
from planner._wrapper import apply_checkpointing  # noqa: E402
from planner.measure import sgd, training_step  # noqa: E402
from planner.memory import static_floor_bytes  # noqa: E402
from planner.oracle import memtracker_peak  # noqa: E402

GPU_PRICE = "h100-80gb"  # the roofline the plans are priced on (H100 or H200 lent here)
# (label, spec factory, batch): sized so that a step fits a 40 GiB GPU unplanned.
GPU_CASES: list[tuple[str, Callable[[], ModelSpec], int]] = [
    ("rg8gf", lambda: get_model_spec("rg8gf"), 8),
    ("rg32gf", lambda: get_model_spec("rg32gf"), 4),
    ("hf-regnet-y-400mf", lambda: _hf("regnet_y_400mf", 224), 64),
]
DRY_CASES: list[tuple[str, Callable[[], ModelSpec], int]] = [
    ("toy-vit", lambda: _toy(), 2),
    ("hf-regnet", lambda: _hf("regnet_small"), 2),
]


def _hf(name: str, *args) -> ModelSpec:
    import oracle_models

    return getattr(oracle_models, name)(*args)


def _toy() -> ModelSpec:
    import toy_models

    return toy_models.vit_spec()


BN_SHAPE = (16, 256, 28, 28)  # (N, C, H, W): a large stage's BatchNorm input
BN_DRY_SHAPE = (8, 16, 6, 6)


def bn_rows(device: str, shape: tuple[int, ...]) -> list[dict]:
    """One row per (dtype, path) of fsdpkit's BatchNorm at world size 1: see the module
    docstring. ``err_over_floor`` <= ~1.25 is FP32 arithmetic on the low-precision input."""
    import torch.nn.functional as F

    from fsdpkit import syncbn
    from planner import LiveMemory

    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1
    r64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    c, rows = shape[1], []
    w64 = torch.linspace(-1.0, 2.0, c, dtype=torch.float64)
    b64 = torch.linspace(0.5, -0.25, c, dtype=torch.float64)

    def reference(xr, rr, acc, low=None):
        x_ = xr.to(acc).clone().requires_grad_()
        out = F.batch_norm(x_, None, None, w64.to(acc), b64.to(acc), True, 0.1, 1e-5)
        (out * rr.to(acc)).sum().backward()
        res = (out.detach(), x_.grad)
        return res if low is None else tuple(t.to(low).double() for t in res)

    paths = {"torch kernel": None, "fused sync-BN kernels": True, "composed ops": False}
    for dt in (torch.float16, torch.bfloat16):
        xr, rr = x64.to(dt).double(), r64.to(dt).double()
        ref = reference(xr, rr, torch.float64)
        f32 = reference(xr, rr, torch.float32, dt)
        floor = [(a - b).abs().max().item() for a, b in zip(f32, ref, strict=True)]
        for name, fused in paths.items():
            if fused and device != "cuda":
                continue  # torch's sync-BN kernels are CUDA-only
            x = xr.to(dt).to(device).requires_grad_()
            w = w64.float().to(device).requires_grad_()
            b = b64.float().to(device).requires_grad_()
            rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
            saved: list[int] = []
            tracker = LiveMemory()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = torch.cuda.memory_allocated()
            else:
                tracker.register([x, w, b, rm, rv])
                start = tracker.live
            keep = syncbn._use_fused_kernels
            if fused is False:
                syncbn._use_fused_kernels = lambda _t: False
            try:
                with tracker if device != "cuda" else contextlib.nullcontext():
                    with torch.autograd.graph.saved_tensors_hooks(
                        lambda t, saved=saved: saved.append(t.nbytes) or t, lambda t: t
                    ):
                        if fused is None:
                            out = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
                        else:
                            out = syncbn.BatchNormFn.apply(x, w, b, rm, rv, 1e-5, 0.1, None, 1)
                    (out * rr.to(dt).to(device)).sum().backward()
            finally:
                syncbn._use_fused_kernels = keep
            if device == "cuda":
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - start
            else:
                peak = tracker.peak - start
            err = [(out.detach().double().cpu() - ref[0]).abs().max().item(),
                   (x.grad.double().cpu() - ref[1]).abs().max().item()]  # fmt: skip
            rows.append({
                "dtype": str(dt).removeprefix("torch."), "path": name, "shape": list(shape),
                "err_over_floor": max(e / max(f, 1e-30) for e, f in zip(err, floor, strict=True)),
                "saved_over_input": sum(saved) / x.nbytes, "peak_over_input": peak / x.nbytes,
            })  # fmt: skip
    return rows


def check_case(label: str, spec: ModelSpec, batch: int, device: str) -> list[dict]:
    """Rows for one model: no checkpointing, and the plan for a budget 70% of the way from the
    static floor (parameters, gradients, optimizer state: no plan goes below) to that peak."""
    prof = profile_model(spec, batch)  # meta: the prediction never sees the device
    cfg = MemoryConfig()
    n = len(prof.units)
    plain = estimate(prof, [(0, n, False)], cfg).peak_bytes
    floor = static_floor_bytes(prof, cfg)
    budget = int(floor + 0.7 * (plain - floor))
    units = plan_checkpoints(prof, budget, cfg, granularity="unit", device=GPU_PRICE)
    op = plan_checkpoints(prof, budget, cfg, granularity="op", device=GPU_PRICE)
    rows, cuda = [], device == "cuda"
    for name, plan, segs, sel in (
        ("no checkpointing", None, [(0, n, False)], ()),
        ("plan, whole units", units, list(units.segments), ()),
        ("plan, op-level", op, list(op.segments), op.selective_spec),
    ):
        predicted = estimate(prof, segs, cfg, sel).peak_bytes
        step = measure_step(spec, batch, segs, device=device, selective=sel)
        rows.append(
            {
                "model": label,
                "batch": batch,
                "plan": name,
                "segments": [list(s) for s in segs],
                "selective": [list(x) for x in sel],
                "budget_bytes": plan.budget_bytes if plan else None,
                "recompute_time_fraction": plan.recompute_time_fraction if plan else 0.0,
                "step_time_s": step_seconds(spec, batch, segs, sel, device, 5 if cuda else 1),
                "predicted_bytes": predicted,
                "measured_bytes": step.peak_bytes,
                "measured_by": "max_memory_allocated" if device == "cuda" else "LiveMemory",
                "nvml_used_bytes": step.extra.get("nvml_used_bytes"),
                "max_reserved_bytes": step.extra.get("max_reserved_bytes"),
                "memtracker_bytes": memtracker_peak(spec, batch, segs, selective=sel),
                "error": (predicted - step.peak_bytes) / step.peak_bytes,
            }
        )
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def step_seconds(spec: ModelSpec, batch: int, segs, sel, device: str, steps: int = 5) -> float:
    """Median wall time of a steady-state FP32 training step with the plan applied."""
    torch.manual_seed(0)
    dev = torch.device(device)
    model = spec.build_model(dev).train()
    apply_checkpointing(spec, model, segs, sel)
    step = training_step(spec, model, sgd(model, 1e-5), spec.example_input(batch, dev))
    step()  # warm-up
    times = []
    for _ in range(steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    del model, step
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times)


def run(cases, device: str, budget_s: float) -> dict:
    """Run ``cases`` on ``device`` until ``budget_s`` seconds have passed; what was skipped is
    listed, never silently dropped."""
    t0 = time.perf_counter()
    rows, skipped = [], []
    for label, factory, batch in cases:
        if time.perf_counter() - t0 > budget_s:
            skipped.append(label)
            continue
        rows += check_case(label, factory(), batch, device)
    bn = bn_rows(device, BN_SHAPE if device == "cuda" else BN_DRY_SHAPE)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    return {"device": device, "gpu": gpu, "rows": rows, "skipped": skipped, "batchnorm": bn,
            "wall_s": time.perf_counter() - t0}  # fmt: skip


def _table(data: dict) -> Table:
    table = Table(title=f"predicted vs measured peak ({data['device']})")
    for col in ("model", "batch", "plan", "predicted", "measured", "NVML used", "MemTracker",
                "error", "step s", "roofline recompute"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("model", "plan") else "right")
    mib = 2**20
    for r in data["rows"]:
        nvml = r["nvml_used_bytes"]
        table.add_row(r["model"], str(r["batch"]), r["plan"], f"{r['predicted_bytes'] / mib:.1f}",
                      f"{r['measured_bytes'] / mib:.1f}",
                      f"{nvml / mib:.0f}" if nvml is not None else "-",
                      f"{r['memtracker_bytes'] / mib:.1f}", f"{r['error']:+.2%}",
                      f"{r['step_time_s']:.3f}", f"{r['recompute_time_fraction']:.1%}")  # fmt: skip
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/gpu_check.json"))
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting cases after")
    p.add_argument("--dry-run", action="store_true", help="no GPU: small models on the CPU")
    args = p.parse_args(argv)
    if args.dry_run:
        data = run(DRY_CASES, "cpu", args.budget_s)
    else:
        if not torch.cuda.is_available():
            print("gpu_check: error: no CUDA device (use --dry-run to test the script)")
            return 2
        data = run(GPU_CASES, "cuda", args.budget_s)
    bn = Table(title="BatchNorm, world size 1 (error / noise floor; bytes / input bytes)")
    for col in ("dtype", "path", "error / floor", "saved / input", "peak / input"):
        bn.add_column(col)
    for r in data["batchnorm"]:
        bn.add_row(r["dtype"], r["path"], f"{r['err_over_floor']:.2f}",
                   f"{r['saved_over_input']:.2f}", f"{r['peak_over_input']:.2f}")  # fmt: skip
    Console(width=150).print(bn)
    report(_table(data), args.out, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
