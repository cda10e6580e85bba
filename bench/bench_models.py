"""Model construction and costing benchmark: prints a table, writes bench/results/models.json.

Measures, per preset (median of ``--repeat`` runs):
- build on ``meta`` (no allocation; the target is regnet10b < 2 s);
- build on CPU our way (create on meta, ``to_empty``, one init pass) vs the usual way (create on
  CPU with PyTorch's default init, then re-initialise): same weights written, one pass fewer;
- analytic trunk FLOPs (pure arithmetic) vs ``FlopCounterMode`` over a meta forward.

    python bench/bench_models.py [--repeat 5] [--cpu-max-params 2e8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _report import report
from rich.table import Table

from fsdpkit import count_forward_flops
from seer_train.models import PRESETS, RegNetTrunk, SwAVHead, SwAVModel, build_swav_model
from seer_train.models.regnet import init_weights


def _median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _build_usual(preset) -> torch.nn.Module:
    model = SwAVModel(RegNetTrunk(preset.regnet), SwAVHead(preset.head_dims), preset.num_prototypes)
    init_weights(model)
    return model


def run(repeat: int, cpu_max_params: float) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    count_forward_flops(
        build_swav_model(PRESETS["tiny"], "meta"), torch.empty(1, 3, 32, 32, device="meta")
    )
    for name, preset in PRESETS.items():
        meta_model = build_swav_model(preset, "meta")
        params = sum(p.numel() for p in meta_model.parameters())
        row = {"model": name, "params": params}
        row["meta_build_s"] = _median_s(lambda p=preset: build_swav_model(p, "meta"), repeat)
        row["analytic_flops_s"] = _median_s(lambda p=preset: p.regnet.unit_costs(224), repeat)
        x = torch.empty(1, 3, 224, 224, device="meta")
        row["counted_flops_s"] = _median_s(
            lambda m=meta_model, x=x: count_forward_flops(m.trunk, x), repeat
        )
        if params <= cpu_max_params:
            row["cpu_build_ours_s"] = _median_s(lambda p=preset: build_swav_model(p, "cpu"), repeat)
            row["cpu_build_usual_s"] = _median_s(lambda p=preset: _build_usual(p), repeat)
        rows.append(row)
    return rows


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v * 1e3:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cpu-max-params", type=float, default=2e8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/models.json"))
    args = parser.parse_args()
    rows = run(args.repeat, args.cpu_max_params)
    table = Table(
        title=f"Model build and costing, ms (median of {args.repeat}), torch {torch.__version__}"
    )
    for col in ("model", "params", "meta build", "CPU ours", "CPU usual", "usual/ours",
                "FLOPs analytic", "FLOPs counted"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        ours, usual = r.get("cpu_build_ours_s"), r.get("cpu_build_usual_s")
        table.add_row(
            r["model"],
            f"{r['params'] / 1e6:,.1f}M",
            _fmt(r["meta_build_s"]),
            _fmt(ours),
            _fmt(usual),
            f"{usual / ours:.2f}×" if ours else "—",
            _fmt(r["analytic_flops_s"]),
            _fmt(r["counted_flops_s"]),
        )
    report(table, args.out, {"torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
