"""The ``ckpt`` command: ``ckpt verify PATH`` and ``ckpt inspect PATH`` (``--json``).

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

from fsdpkit import FsdpkitError
from fsdpkit._console import stdout_console
from fsdpkit.units import format_bytes

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
        print(f"{args.path}: complete; {result['files']} files, {n} tensor shards; {what} ok")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect(args.path)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    title = (
        f"{args.path}: step {info['step']}, world size {info['world_size']}, "
        f"{info['files']} files, {format_bytes(info['total_bytes'])}"
    )
    table = Table(title=title, box=box.SIMPLE_HEAD)
    table.add_column("kind")
    table.add_column("tensors", justify="right")
    table.add_column("bytes", justify="right")
    for kind, k in info["kinds"].items():
        table.add_row(kind, str(k["tensors"]), format_bytes(k["bytes"]))
    stdout_console().print(table)
    dtypes = ", ".join(f"{d} {format_bytes(b)}" for d, b in info["dtypes"].items())
    print(f"dtypes: {dtypes}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckpt", description="fsdpkit checkpoint tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("verify", help="check completeness, sizes and per-tensor checksums")
    p.add_argument("path")
    p.add_argument("--no-checksums", action="store_true", help="sizes and headers only")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_verify)
    p = sub.add_parser("inspect", help="step, world size, tensors, dtypes and bytes")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FsdpkitError as e:
        print(f"ckpt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
