"""Fault injection for crash-safety tests: SIGKILL a process at its n-th call of chosen functions.

Kill points counted in calls (a tensor's bytes, an fsync, a rename), not seconds, land in the
same place on every machine, whatever its speed or load.
"""

import itertools
import os
import signal
import threading


def kill_at_nth_call(targets, kill_at):
    """Wrap ``getattr(owner, name)`` for every ``(owner, name)`` in ``targets`` so that this
    process SIGKILLs itself just before the ``kill_at``-th call among them (``None``: never).
    Returns a function giving the number of calls made so far. Call it in a forked child."""
    calls, lock = itertools.count(1), threading.Lock()

    def counted(fn):
        def call(*args, **kwargs):
            with lock:
                n = next(calls)
            if n == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return call

    for owner, name in targets:
        setattr(owner, name, counted(getattr(owner, name)))
    return lambda: next(calls) - 1
