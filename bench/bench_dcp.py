"""DCP in: ``ckpt reslice`` of a PyTorch DCP checkpoint vs ``dcp_to_torch_save``; prints a
table and writes bench/results/dcp.json.

A ``--model`` (default rg16gf: 115 M parameters; parameters + AdamW state ≈ 1.4 GB) sharded by
fsdpkit (FSDP2) on 2 gloo ranks saves with ``torch.distributed.checkpoint.save``; then, each in
a fresh interpreter, one run each:

- ours: ``ckpt.reslice(dcp, sliced, with_optimizer=True)``: streams, every chunk's CRC-32
  checked, the slices' CRC-32s combined from the chunks';
- peer: ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save(dcp, file)``: loads the
  whole state into memory, then ``torch.save``.

Seconds of the conversion alone, and the process's peak RSS (imports included). Targets: ≥ 5×
faster, ≤ ⅕ the RSS. For scale, a raw sequential copy of the DCP files with fsync (what the
disk gives; ``reslice`` fsyncs its output, ``dcp_to_torch_save`` does not). Afterwards every
tensor of the two outputs is compared bitwise.

    python bench/bench_dcp.py [--model rg16gf] [--dir /tmp/fsdpkit-bench-dcp]
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch
from _report import report
from bench_ckpt import _child, _raw_copy
from rich.table import Table
from safetensors import safe_open

from ckpt import read_sliced_manifest
from fsdpkit import FSDPPolicy, get_model_spec, parallelize
from fsdpkit.testing import run_distributed


def save_dcp(model_name: str, path: str) -> None:
    """On each rank: the model sharded, AdamW state present, saved by DCP (by name)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    spec = get_model_spec(model_name)
    torch.manual_seed(0)
    model = spec.build_model("cpu")
    units = [m for _, m in spec.named_units(model)]
    parallelize(model, units=units, policy=FSDPPolicy(sync_bn_group_size=-1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # exp_avg, exp_avg_sq and step exist
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def _bitwise_equal(sliced: Path, torch_file: Path) -> bool:
    """Every tensor of the slices equals the same tensor of ``dcp_to_torch_save``'s file."""
    theirs = torch.load(torch_file, mmap=True, weights_only=True)
    manifest = read_sliced_manifest(sliced)
    for name, meta in manifest["tensors"].items():
        kind, _, rest = name.partition("/")
        if kind == "optim":
            pname, key = rest.rsplit("/", 1)
            ref = theirs["optim"]["state"][pname][key]
        else:
            ref = theirs["model"][rest]
        with safe_open(sliced / meta["file"], "pt") as f:
            if not torch.equal(f.get_tensor(name), ref):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rg16gf")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/fsdpkit-bench-dcp"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/dcp.json"))
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    src, sliced, single = args.dir / "dcp", args.dir / "sliced", args.dir / "dcp.pt"
    run_distributed(save_dcp, 2, args.model, str(src), timeout_s=1800)
    dcp_bytes = sum(f.stat().st_size for f in src.iterdir())
    os.sync()
    ours_s, ours_rss = _child(
        "from ckpt import reslice", f"reslice({str(src)!r}, {str(sliced)!r}, with_optimizer=True)"
    )
    os.sync()
    theirs_s, theirs_rss = _child(
        "from torch.distributed.checkpoint.format_utils import dcp_to_torch_save",
        f"dcp_to_torch_save({str(src)!r}, {str(single)!r})",
    )
    os.sync()
    copy_s = _raw_copy(src, args.dir / "copy")
    equal = _bitwise_equal(sliced, single)
    table = Table(title=f"{args.model}: {dcp_bytes / 2**30:.2f} GiB DCP checkpoint (parameters "
                  "+ AdamW state, 2 ranks), one run each")  # fmt: skip
    for col in ("what", "ckpt reslice", "dcp_to_torch_save", "ours ÷ peer", "target"):
        table.add_column(col, justify="left" if col == "what" else "right")
    table.add_row("time", f"{ours_s:.2f} s", f"{theirs_s:.2f} s", f"{ours_s / theirs_s:.2f}",
                  "≤ 0.20")  # fmt: skip
    table.add_row("peak RSS", f"{ours_rss / 2**20:,.0f} MiB", f"{theirs_rss / 2**20:,.0f} MiB",
                  f"{ours_rss / theirs_rss:.2f}", "≤ 0.20")  # fmt: skip
    table.add_row("raw copy + fsync", f"{copy_s:.2f} s", "", f"{ours_s / copy_s:.2f}", "")
    report(table, args.out, {
        "model": args.model, "dcp_bytes": dcp_bytes, "reslice_s": ours_s,
        "reslice_peak_rss": ours_rss, "dcp_to_torch_save_s": theirs_s,
        "dcp_to_torch_save_peak_rss": theirs_rss, "speedup": theirs_s / ours_s,
        "rss_ratio": ours_rss / theirs_rss, "raw_copy_fsync_s": copy_s, "bitwise_equal": equal,
    })  # fmt: skip
    print(f"{theirs_s / ours_s:.1f}× faster (target ≥ 5×), {ours_rss / theirs_rss:.2f} of the "
          f"RSS (target ≤ 0.20); outputs bitwise equal: {equal}")  # fmt: skip
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
