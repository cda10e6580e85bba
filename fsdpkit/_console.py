"""One console policy for every CLI table."""

import sys

from rich.console import Console


def stdout_console() -> Console:
    """Terminal width on a terminal; 160 columns into pipes and logs, where nothing wraps."""
    return Console() if sys.stdout.isatty() else Console(width=160)
