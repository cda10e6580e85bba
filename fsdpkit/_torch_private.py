"""The PyTorch internals fsdpkit relies on where no public API does the job, in one place.

Nothing else in fsdpkit reaches into torch for these jobs; each entry says why no public API
serves and is pinned by ``tests/test_torch_private.py``, which fails naming the internal when a
torch release changes it (the project supports torch >= 2.6).

1. :func:`checkpoint_region`: ``torch.utils.checkpoint._checkpoint_without_reentrant_generator``.
   The public ``torch.utils.checkpoint.checkpoint(fn, ..., use_reentrant=False)`` calls ``fn``
   itself, so the checkpointed region must be one callable. :func:`fsdpkit.apply_ac`'s region
   is not: it opens in a forward pre-hook of a segment's first unit and closes in a forward hook
   of its last, while the model's own code (its loops, the arguments it computes between units)
   runs in between, and units must stay called by that code so that FSDP2's hooks see them.
   The generator is the public function's own engine (``checkpoint`` is ``next(gen)``,
   ``fn(...)``, ``next(gen)``) and torch's hook-based ``torch.distributed._composable.checkpoint``
   drives it from hooks the same way. Re-implementing it on the public ``saved_tensors_hooks``
   would copy its RNG/autocast/device-state restore, early stop and determinism check, and
   need the private ``torch._C._current_graph_task_id`` to keep recomputations apart per
   backward as it does: more private surface, not less, and memory no longer torch's own.
2. :func:`queue_end_of_backward`: ``torch.autograd.Variable._execution_engine.queue_callback``,
   how DDP, FSDP2 itself (which fsdpkit builds on) and ``torch.utils.module_tracker`` run code
   when a backward ends. No public hook fires then: a post-accumulate-grad hook fires per
   parameter, and knowing which parameter is the last to come takes
   ``torch.autograd.graph.register_multi_grad_hook``, which (torch 2.13) makes
   ``torch.autograd.grad`` with respect to those parameters raise ("A leaf node was passed to
   _will_engine_execute_node ...") and holds every gradient until the last arrives, so that
   ``AccumulateGrad`` copies each one instead of taking it.
3. :func:`time_work_waits`: ``torch.distributed.Work.wait`` replaced on the class while a
   timer is open. A thread blocks on an asynchronous collective in ``Work.wait`` (``dist.*``
   calls without ``async_op`` wait there too, and so does FSDP2), which is no operator (a
   dispatch mode such as ``CommDebugMode`` never sees it) and has no public hook;
   ``torch.profiler`` records it only as a profile read after the fact, at a profiler's cost.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import noop_context_fn

__all__ = [
    "check_checkpoint_region",
    "checkpoint_region",
    "queue_end_of_backward",
    "time_work_waits",
]

try:
    from torch.utils.checkpoint import _checkpoint_without_reentrant_generator as _ckpt_gen
except ImportError:  # reported by check_checkpoint_region, with what to do
    _ckpt_gen = None

_CKPT_NAME = "torch.utils.checkpoint._checkpoint_without_reentrant_generator"
# The generator's options before ``*args``, by name, as ``checkpoint(use_reentrant=False)``
# passes them by default. torch 2.7 added ``early_stop``; an option a later torch adds with a
# default gets that default.
_CKPT_OPTIONS: dict[str, Any] = {
    "preserve_rng_state": True,
    "context_fn": noop_context_fn,
    "determinism_check": "default",
    "debug": False,
    "early_stop": True,
}
_CKPT_REQUIRED = ("preserve_rng_state", "context_fn", "determinism_check", "debug")


def _changed(what: str, user: str = "fsdpkit.apply_ac") -> RuntimeError:
    return RuntimeError(
        f"torch {torch.__version__} changed {what}, which {user} relies on (see "
        "fsdpkit/_torch_private.py and tests/test_torch_private.py); use a torch release "
        "fsdpkit supports"
    )


@functools.cache
def check_checkpoint_region() -> tuple[Any, ...]:
    """The generator's arguments before ``*args``, bound by name; raises ``RuntimeError`` if
    torch no longer has it or its signature is not the one relied on."""
    if _ckpt_gen is None:
        raise _changed(f"{_CKPT_NAME} (it is gone)")
    if not inspect.isgeneratorfunction(_ckpt_gen):
        raise _changed(f"{_CKPT_NAME} (it is no longer a generator function)")
    params = list(inspect.signature(_ckpt_gen).parameters.values())
    kinds = [p.kind for p in params]
    if (
        not params
        or params[0].name != "fn"
        or inspect.Parameter.VAR_POSITIONAL not in kinds
        or kinds[-1] is not inspect.Parameter.VAR_KEYWORD
    ):
        raise _changed(f"{_CKPT_NAME}'s signature to {inspect.signature(_ckpt_gen)}")
    head = []
    for p in params[1 : kinds.index(inspect.Parameter.VAR_POSITIONAL)]:
        if p.name in _CKPT_OPTIONS:
            head.append(_CKPT_OPTIONS[p.name])
        elif p.default is not inspect.Parameter.empty:
            head.append(p.default)
        else:
            raise _changed(f"{_CKPT_NAME} (new option {p.name!r} without a default)")
    missing = [n for n in _CKPT_REQUIRED if n not in {p.name for p in params}]
    if missing:
        raise _changed(f"{_CKPT_NAME} (no option {', '.join(missing)})")
    return tuple(head)


def checkpoint_region(
    fn: Callable[..., Any], *args: Any, context_fn: Callable | None = None, **kwargs: Any
) -> Generator:
    """Non-reentrant checkpointing of a region that is not one call: ``next(gen)`` opens it
    (``args``/``kwargs``, the region's inputs, are saved), the caller runs the region, a second
    ``next(gen)`` closes it (raising ``StopIteration``). Tensors saved for backward inside it
    are dropped and recomputed in backward by ``fn(*args, **kwargs)``, with the RNG state of
    the forward, exactly as ``torch.utils.checkpoint.checkpoint(fn, *args,
    use_reentrant=False, context_fn=context_fn)`` does (``context_fn``: e.g. selective
    checkpointing's ``create_selective_checkpoint_contexts``)."""
    head = check_checkpoint_region()
    if context_fn is not None:
        head = tuple(context_fn if i == _context_fn_position() else v for i, v in enumerate(head))
    return _ckpt_gen(fn, *head, *args, **kwargs)


@functools.cache
def _context_fn_position() -> int:
    names = list(inspect.signature(_ckpt_gen).parameters)
    return names.index("context_fn") - 1  # after ``fn``


_ENGINE_NAME = "torch.autograd.Variable._execution_engine.queue_callback"


def queue_end_of_backward(callback: Callable[[], None]) -> None:
    """Run ``callback()`` once the backward that is running has finished (every gradient
    accumulated), before it returns. Call it from inside that backward (a hook)."""
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    queue = getattr(engine, "queue_callback", None)
    if queue is None:
        raise _changed(f"{_ENGINE_NAME} (it is gone)", "replicated BatchNorm")
    queue(callback)


# Work.wait timers: one replacement on the class while any timer is open, shared by all of
# them (nested or overlapping), and the original put back when the last one closes.
_wait_lock = threading.Lock()
_wait_listeners: dict[object, Callable[[float], None]] = {}
_wait_original: Callable[..., Any] = dist.Work.wait if dist.is_available() else None


def _timed_wait(work: Any, *args: Any, **kwargs: Any) -> Any:
    t0 = time.perf_counter()
    try:
        return _wait_original(work, *args, **kwargs)
    finally:
        elapsed = time.perf_counter() - t0
        for listener in list(_wait_listeners.values()):
            listener(elapsed)


@contextmanager
def time_work_waits(on_wait: Callable[[float], None]) -> Iterator[None]:
    """Call ``on_wait(seconds)`` after every ``torch.distributed.Work.wait`` (from any thread of
    the process) while the context is open."""
    global _wait_original
    if not dist.is_available():  # no collectives, nothing to wait for
        yield
        return
    token = object()
    with _wait_lock:
        if not _wait_listeners and dist.Work.wait is not _timed_wait:
            _wait_original = dist.Work.wait
            dist.Work.wait = _timed_wait
        _wait_listeners[token] = on_wait
    try:
        yield
    finally:
        with _wait_lock:
            del _wait_listeners[token]
            if not _wait_listeners and dist.Work.wait is _timed_wait:
                dist.Work.wait = _wait_original  # (if someone replaced it since: theirs stays)
