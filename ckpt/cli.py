"""The ``ckpt`` command: ``ckpt reslice SRC DST``, ``ckpt verify PATH``, ``ckpt inspect PATH``,
``ckpt export SRC DST --format hf|single`` (Hugging Face safetensors) and
``ckpt import-vissl SRC DST --model NAME`` (SEER/VISSL weights into fsdpkit slices).

``PATH`` / ``SRC`` is an fsdpkit checkpoint or a PyTorch DCP directory (``.metadata`` and
``__R_F.distcp`` files from ``torch.distributed.checkpoint.save``).

Bad input (a missing, incomplete or corrupt checkpoint) prints one line ``ckpt: error: …``
naming the file and tensor, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rich import box
from rich.table import Table

from kitcore import FsdpkitError
from kitcore.console import run_command, stdout_console
from kitcore.units import format_bytes

from ._cli_formats import add_format_commands
from .verify import inspect, verify

__all__ = ["main"]


def _cmd_verify(args: argparse.Namespace) -> int:
    manifest = verify(args.path, checksums=not args.no_checksums)
    n = sum(len(t["shards"]) for t in manifest["tensors"].values())
    result = {"path": args.path, "ok": True, "files": len(manifest["files"]), "shards": n,
              "checksums": not args.no_checksums}  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        what = "sizes and checksums" if result["checksums"] else "sizes"
        print(f"{args.path}: complete; {result['files']} files, {n} tensors or shards; {what} ok")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect(args.path)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    world = "source world size" if info["kind"] == "sliced" else "world size"
    step = "" if info["step"] is None else f"step {info['step']}, "  # DCP records no step
    title = (
        f"{args.path}: {info['kind']}, {step}{world} {info['world_size']}, "
        f"{info['files']} files, {format_bytes(info['total_bytes'])}"
    )
    stdout_console().print(title, highlight=False)
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("kind")
    table.add_column("tensors", justify="right")
    table.add_column("bytes", justify="right")
    for kind, k in info["kinds"].items():
        table.add_row(kind, str(k["tensors"]), format_bytes(k["bytes"]))
    stdout_console().print(table)
    dtypes = ", ".join(f"{d} {format_bytes(b)}" for d, b in info["dtypes"].items())
    print(f"dtypes: {dtypes}")
    return 0


def _cmd_reslice(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from .sliced import reslice

    if args.workers < 1:
        raise FsdpkitError(f"--workers must be >= 1, got {args.workers}")
    live = sys.stderr.isatty() and not args.json  # a bar is for terminals, not logs
    with Progress(console=Console(stderr=True), disable=not live, transient=True) as progress:
        task = progress.add_task("reslicing", total=None)

        def on_unit(unit: str, i: int, total: int) -> None:
            progress.update(task, completed=i, total=total, description=f"unit {unit}")

        dst = reslice(args.src, args.dst, with_optimizer=args.with_optimizer,
                      workers=args.workers, on_unit=on_unit)  # fmt: skip
    info = json.loads((dst / "manifest.json").read_text())
    result = {"dst": str(dst), "units": len(info["units"]), "tensors": len(info["tensors"]),
              "bytes": sum(f["bytes"] for f in info["files"].values())}  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{dst}: {result['units']} unit files, {result['tensors']} tensors, "
              f"{format_bytes(result['bytes'])}")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckpt", description="fsdpkit checkpoint tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("verify", help="check completeness, sizes and per-tensor checksums")
    p.add_argument("path")
    p.add_argument("--no-checksums", action="store_true", help="sizes and headers only")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_verify)
    p = sub.add_parser("reslice", help="sharded or DCP checkpoint → one file per unit")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--with-optimizer", action="store_true", help="also slice optimizer state")
    p.add_argument("--workers", type=int, default=4, help="threads copying chunks in parallel")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_reslice)
    p = sub.add_parser("inspect", help="step, world size, tensors, dtypes and bytes")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_inspect)
    add_format_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("ckpt", build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
