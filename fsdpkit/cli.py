"""The ``fsdpkit`` command: thin wrappers over library functions.

Every command has ``--json``; bad input prints one line ``fsdpkit: error: …`` on stderr and
exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kitcore.console import run_command, stdout_console
from kitcore.registry import available_models, get_model_spec

from .summary import ModelSummary, summarize_model

__all__ = ["COMMANDS_GROUP", "main"]

# Entry-point group of functions ``add_parsers(subparsers)`` adding `fsdpkit` subcommands.
COMMANDS_GROUP = "fsdpkit.commands"


def _human(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:g}"


def _gflops(flops: float) -> str:
    return f"{flops / 1e9:,.1f}" if flops >= 1e10 else f"{flops / 1e9:.3g}"


def _cell(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "/".join(str(v) for v in value)
    return str(value)


# Info keys shown in the size table; every other info key goes to the architecture table.
_SIZE_INFO = {"trunk_gflops_224px": "trunk GFLOPs 224px", "crops": "sample"}
_HIDDEN_INFO = {"source"}


def models_tables(summaries: Sequence[ModelSummary]) -> list[Table]:
    """Two rich tables: size and compute (parameters per part, GFLOPs), and architecture."""
    parts = list(dict.fromkeys(p for s in summaries for p in s.parameters if p != "total"))
    keys = [k for k in dict.fromkeys(k for s in summaries for k in s.info) if k not in _HIDDEN_INFO]
    size_keys = [k for k in keys if k in _SIZE_INFO]
    arch_keys = [k for k in keys if k not in _SIZE_INFO]

    size = Table(
        title="Parameters and forward GFLOPs (1 GFLOP = 1e9 FLOPs = 5e8 MACs)", box=box.SIMPLE_HEAD
    )
    size.add_column("model", style="bold", no_wrap=True)
    size.add_column("units", justify="right", overflow="fold")
    for p in parts:
        size.add_column(p, justify="right", overflow="fold")
    size.add_column("total", justify="right", overflow="fold")
    size.add_column("GFLOPs/sample", justify="right", overflow="fold")
    for k in size_keys:
        size.add_column(_SIZE_INFO[k], justify="right", overflow="fold")
    for s in summaries:
        row = [s.name, str(s.num_units)]
        row += [_human(s.parameters[p]) if p in s.parameters else "—" for p in parts]
        row += [_human(s.parameters["total"]), _gflops(s.flops_per_sample)]
        row += [_cell(s.info[k]) if k in s.info else "—" for k in size_keys]
        size.add_row(*row)
    tables = [size]
    if arch_keys:
        arch = Table(title="Architecture", box=box.SIMPLE_HEAD)
        arch.add_column("model", style="bold", no_wrap=True)
        for k in arch_keys:
            arch.add_column(k.replace("_", " "), justify="right", overflow="fold")
        for s in summaries:
            arch.add_row(s.name, *[_cell(s.info[k]) if k in s.info else "—" for k in arch_keys])
        tables.append(arch)
    return tables


def _cmd_models(args: argparse.Namespace) -> int:
    specs = [get_model_spec(n) for n in args.names or available_models()]  # fail fast
    summaries = []
    with Progress(console=Console(stderr=True), transient=True, disable=args.json) as progress:
        for spec in progress.track(specs, description="building models on meta"):
            summaries.append(summarize_model(spec))
    if not args.names:  # smallest first, as the tables read best
        summaries.sort(key=lambda s: s.parameters["total"])
    if args.json:
        print(json.dumps([s.to_json() for s in summaries], indent=2))
        return 0
    console = stdout_console()
    for table in models_tables(summaries):
        console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsdpkit", description="Memory planning and FSDP2 tooling for giant vision models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "models",
        help="table of registered models: parameters, FLOPs, architecture",
        description="Build each model on the meta device (no memory) and tabulate it.",
    )
    p.add_argument(
        "names", nargs="*", metavar="MODEL", help="registered name or package.module:factory"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_models)
    # Commands of other packages (the planner's `plan` and `profile`) come through an entry
    # point group, so the wrapper never imports the planner: the planner sits below it.
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("fsdpkit", build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
