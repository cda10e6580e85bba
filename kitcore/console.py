"""One console policy for every CLI table."""

import sys

from rich.console import Console


def stdout_console() -> Console:
    """Terminal width on a terminal; 160 columns into pipes and logs, where nothing wraps."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def run_command(prog: str, parser, argv, errors: tuple[type[Exception], ...] = ()) -> int:
    """Parse ``argv`` and run the chosen command: a user error (:class:`FsdpkitError` or one of
    ``errors``) is one line ``prog: error: …`` on stderr and exit status 2; Ctrl-C is exit
    status 130."""
    from .errors import FsdpkitError

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FsdpkitError, *errors) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
