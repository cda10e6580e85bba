"""What every benchmark ends with: print its table, write its JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def report(table: Table, out: Path, data: Any) -> None:
    Console(width=150).print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    print(f"wrote {out}")
