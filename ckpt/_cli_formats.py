"""``ckpt export`` (Hugging Face out) and ``ckpt import-vissl`` (SEER weights in): thin wrappers
over :func:`ckpt.export.export_hf` and :func:`ckpt.vissl.import_vissl`."""

from __future__ import annotations

import argparse
import json

from rich import box
from rich.table import Table

from kitcore.console import stdout_console
from kitcore.units import format_bytes

__all__ = ["add_format_commands"]


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_hf

    info = export_hf(args.src, args.dst, format=args.format, dtype=args.dtype,
                     max_shard_bytes=args.max_shard_bytes)  # fmt: skip
    if args.json:
        print(json.dumps(info))
        return 0
    left = ", ".join(f"{n} {k}" for k, n in info["left_out"].items()) or "nothing"
    stdout_console().print(
        f"{info['dst']}: {info['tensors']} tensors from a {info['source']} checkpoint, "
        f"{format_bytes(info['total_size'])} ({info['dtype']}); left out: {left}",
        highlight=False,
    )
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("file")
    table.add_column("tensors", justify="right")
    table.add_column("bytes", justify="right")
    for name, f in info["files"].items():
        table.add_row(name, str(f["tensors"]), format_bytes(f["bytes"]))
    stdout_console().print(table)
    return 0


def _cmd_import_vissl(args: argparse.Namespace) -> int:
    from .vissl import import_vissl

    info = import_vissl(args.src, args.dst, model=args.model)
    if args.json:
        print(json.dumps(info))
        return 0
    table = Table(box=box.SIMPLE_HEAD, title=f"{info['dst']}: fsdpkit slices of {info['model']}")
    for column in ("VISSL file", "units", "tensors", "bytes"):
        table.add_column(column, justify="left" if column == "VISSL file" else "right")
    table.add_row(info["vissl_type"], str(info["units"]), str(info["tensors"]),
                  format_bytes(info["bytes"]))  # fmt: skip
    stdout_console().print(table)
    return 0


def add_format_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``export`` and ``import-vissl`` on the ``ckpt`` parser's subcommands."""
    p = sub.add_parser("export", help="sliced or sharded checkpoint → Hugging Face safetensors")
    p.add_argument("src")
    p.add_argument("dst", help="new directory (never overwritten)")
    p.add_argument("--format", choices=("hf", "single"), default="hf",
                   help="hf: numbered files + model.safetensors.index.json; "
                        "single: one model.safetensors")  # fmt: skip
    p.add_argument("--dtype", choices=("bf16", "fp16"), default=None,
                   help="convert floating-point tensors (default: as saved)")  # fmt: skip
    p.add_argument("--max-shard-bytes", type=int, default=5 * 10**9,
                   help="largest file of --format hf in bytes (default 5e9)")  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("import-vissl", help="VISSL / SEER checkpoint → fsdpkit slices")
    p.add_argument("src", help="consolidated .torch file, or a sliced checkpoint's slice list")
    p.add_argument("dst", help="new sliced checkpoint directory (never overwritten)")
    p.add_argument("--model", required=True, help="registered RegNetY model: rg8gf … regnet10b")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_import_vissl)
