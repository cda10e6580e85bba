"""Model registry: a frozen :class:`ModelSpec` per model, discovered through entry points.

Any installed distribution registers models in the ``fsdpkit.models`` entry-point group; the
entry point names the model and points at a zero-argument factory returning a
:class:`ModelSpec` (or at a spec itself)::

    [options.entry_points]
    fsdpkit.models =
        my-vit = my_pkg.models:vit_spec

A model that is not installed is addressed as ``package.module:factory``. The library never
imports a particular model package: ``seer_train`` is one plug-in among others.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .errors import ModelNotFoundError, ModelSpecError

__all__ = [
    "ENTRY_POINT_GROUP",
    "ModelSpec",
    "available_models",
    "default_loss",
    "discover_units",
    "get_model_spec",
    "module_spec",
]

ENTRY_POINT_GROUP = "fsdpkit.models"


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """What fsdpkit needs to know about a model, and nothing more.

    Fields:
        name: registry name (``"regnet10b"``).
        build: ``build(device) -> nn.Module``, the whole training model (trunk and heads) in
            FP32. Must work on ``torch.device("meta")`` without allocating memory.
        example_input: ``example_input(batch_size, device)`` -> the positional input of one
            training forward for a per-GPU batch (a tensor, or a list of tensors for multi-crop).
        units: ``units(model) -> sequence of modules``, the ordered chain that planners,
            activation checkpointing, FSDP and slicing address by index. Each must be a
            submodule of ``model``; the chain must be non-empty and without repeats.
        loss: ``loss(output) -> scalar`` back-propagated when a training step is profiled or
            measured; default :func:`default_loss` (sum of the means of the floating outputs).
        description: one line for tables.
        info: static, JSON-serialisable facts shown by ``fsdpkit models`` (stage widths, …).
    """

    name: str
    build: Callable[[torch.device], nn.Module]
    example_input: Callable[[int, torch.device], Any]
    units: Callable[[nn.Module], Sequence[nn.Module]]
    loss: Callable[[Any], torch.Tensor] | None = None
    description: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ModelSpecError(f"ModelSpec.name must be a non-empty string, got {self.name!r}")
        for attr in ("build", "example_input", "units"):
            if not callable(getattr(self, attr)):
                raise ModelSpecError(f"ModelSpec {self.name!r}: {attr} must be callable")
        object.__setattr__(self, "info", MappingProxyType(dict(self.info)))

    def training_loss(self, output: Any) -> torch.Tensor:
        """The scalar a training step back-propagates for ``output`` of the model."""
        return (self.loss or default_loss)(output)

    def build_model(self, device: torch.device | str = "meta") -> nn.Module:
        """Build the model on ``device`` (default ``meta``: shapes only, no memory)."""
        model = self.build(torch.device(device))
        if not isinstance(model, nn.Module):
            raise ModelSpecError(
                f"model {self.name!r}: build() returned {type(model).__name__}, not an nn.Module"
            )
        return model

    def named_units(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The unit chain as ``(qualified name, module)`` pairs, validated against ``model``."""
        names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        units = list(self.units(model))
        if not units:
            raise ModelSpecError(f"model {self.name!r} has no units: units(model) is empty")
        out: list[tuple[str, nn.Module]] = []
        for i, unit in enumerate(units):
            if id(unit) not in names:
                raise ModelSpecError(
                    f"model {self.name!r}: unit {i} ({type(unit).__name__}) is not a submodule"
                )
            if unit is model:
                raise ModelSpecError(f"model {self.name!r}: unit {i} is the whole model")
            out.append((names[id(unit)], unit))
        if len({id(u) for u in units}) != len(units):
            raise ModelSpecError(f"model {self.name!r}: the same module appears twice in units")
        return out


def default_loss(output: Any) -> torch.Tensor:
    """The sum of the means of every floating-point tensor in ``output`` (nested containers)."""
    leaves = [
        t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    if not leaves:
        raise ModelSpecError("the model's output has no floating-point tensor to back-propagate")
    return sum(t.to(torch.promote_types(t.dtype, torch.float32)).mean() for t in leaves)


def _entry_points() -> dict[str, list[EntryPoint]]:
    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, []).append(ep)
    return found


def available_models() -> list[str]:
    """Names registered in the ``fsdpkit.models`` entry-point group, sorted (nothing imported)."""
    return sorted(_entry_points())


def _as_spec(obj: Any, origin: str) -> ModelSpec:
    if not isinstance(obj, ModelSpec) and callable(obj):
        try:
            obj = obj()
        except TypeError as e:
            raise ModelSpecError(f"{origin}: calling the factory failed: {e}") from e
    if not isinstance(obj, ModelSpec):
        raise ModelSpecError(
            f"{origin} gave {type(obj).__name__}; expected an fsdpkit.ModelSpec or a "
            "zero-argument function returning one"
        )
    return obj


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def discover_units(model: nn.Module, example: Any, pattern: str | None = None) -> list[str]:
    """The unit chain of any ``model``, as qualified module names in execution order.

    Runs ``model(example)`` once (use ``meta`` tensors: nothing is allocated) and records when
    every module's call starts and ends. Blocks: the modules of the class, among those with two
    or more instances, that hold the most parameters (outermost instances of modules with
    children, containers such as ``nn.Sequential`` left out; ties go to the class with more
    instances, so RegNet's layers win over its stages; ConvNeXt's stages hold its
    down-sampling layers too, so they win over its layers: ``--units`` picks finer ones). The
    chain is
    the blocks plus every outermost module that runs before, between or among them and is
    neither inside a block nor contains one (a stem, a patch-merging or down-sampling layer),
    so that checkpointed segments hold all the work between their ends. ``pattern``: a glob
    over module names (``encoder.layer.*``) that selects the units instead.
    """
    calls: dict[str, list[int]] = {}
    clock = [0]
    names = {id(m): n for n, m in model.named_modules()}
    handles = []

    def pre(m, _a):
        calls.setdefault(names[id(m)], [clock[0], -1])
        clock[0] += 1

    def post(m, _a, _o):
        span = calls[names[id(m)]]
        if span[1] < 0:
            span[1] = clock[0]
        clock[0] += 1

    for m in model.modules():
        if m is not model:
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    called = sorted(calls, key=lambda n: calls[n][0])
    if pattern is not None:
        want = pattern.split(".")  # "*" stays within one name component, as in paths
        chosen = [
            n
            for n in called
            if len(parts := n.split(".")) == len(want)
            and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, want, strict=True))
        ]
        if not chosen:
            raise ModelSpecError(f"--units {pattern!r} matches no module the forward calls")
        return chosen

    def inside(a: str, b: str) -> bool:  # a runs within b's call
        return calls[b][0] < calls[a][0] and calls[a][1] <= calls[b][1]

    params = {n: sum(p.numel() for p in model.get_submodule(n).parameters()) for n in called}
    by_class: dict[type, list[str]] = {}
    for n in called:
        m = model.get_submodule(n)
        if next(m.children(), None) is not None and not isinstance(m, _CONTAINERS):
            by_class.setdefault(type(m), []).append(n)
    groups = [
        outer
        for ns in by_class.values()
        if len(outer := [n for n in ns if not any(inside(n, o) for o in ns if o != n)]) >= 2
    ]
    if not groups:
        raise ModelSpecError("no repeated blocks found in the model; pass --units GLOB")
    blocks = max(groups, key=lambda ns: (sum(params[n] for n in ns), len(ns)))
    first, last = calls[blocks[0]][0], max(calls[b][1] for b in blocks)
    chain = []
    for n in called:
        if calls[n][1] > last or any(inside(n, b) or inside(b, n) for b in blocks if b != n):
            continue  # after the blocks (the tail), inside a block, or holding blocks
        if n not in blocks and calls[n][0] > first and not params[n]:
            continue  # parameter-free work among the blocks (activations, dropout)
        if any(inside(n, c) for c in chain):
            continue
        chain.append(n)
    return chain


def module_spec(
    factory: Callable[[], nn.Module],
    input_shape: Sequence[int],
    *,
    name: str,
    units: str | None = None,
) -> ModelSpec:
    """A :class:`ModelSpec` for any ``nn.Module`` built by ``factory()`` (under the target
    device), fed ``(batch, *input_shape)`` random inputs, with its units found by
    :func:`discover_units` (``units``: a glob over module names instead). The loss is
    :func:`default_loss`: the mean of every floating-point output (logits of a classifier)."""
    shape = tuple(int(d) for d in input_shape)

    def build(device: torch.device) -> nn.Module:
        with torch.device(device):
            return factory()

    def example_input(batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.randn(batch_size, *shape, device=device)  # (N, *input_shape)

    model = build(torch.device("meta"))
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{name} returned {type(model).__name__}, not an nn.Module")
    chain = discover_units(model.train(), example_input(2, torch.device("meta")), units)

    def unit_modules(m: nn.Module) -> list[nn.Module]:
        return [m.get_submodule(n) for n in chain]

    return ModelSpec(
        name=name, build=build, example_input=example_input, units=unit_modules,
        description=f"{type(model).__name__} ({len(chain)} units found)",
        info={"units": list(chain), "input_shape": list(shape)},
    )  # fmt: skip


def _load_path(
    path: str, input_shape: Sequence[int] | None = None, units: str | None = None
) -> ModelSpec:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ModelNotFoundError(f"--model {path!r}: expected 'package.module:factory'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        # as `python -m` does: a factory in the current directory imports from a console script
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelNotFoundError(f"--model {path!r}: cannot import {module_name!r}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelNotFoundError(f"--model {path!r}: {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if input_shape is None:
        return _as_spec(obj, f"--model {path!r}")
    return module_spec(obj, input_shape, name=path, units=units)


def get_model_spec(
    name: str, *, input_shape: Sequence[int] | None = None, units: str | None = None
) -> ModelSpec:
    """The spec of a registered model, or of ``package.module:factory``.

    With ``input_shape`` (e.g. ``(3, 224, 224)``), ``package.module:factory`` may instead
    return any ``nn.Module`` (see :func:`module_spec`; ``units``: a glob overriding the found
    unit chain).

    Raises :class:`ModelNotFoundError` (listing the known names) for an unknown name and
    :class:`ModelSpecError` for a plug-in that does not return a valid spec.
    """
    if ":" in name:
        return _load_path(name, input_shape, units)
    if input_shape is not None:
        raise ModelSpecError(f"--input applies to package.module:factory models, not {name!r}")
    eps = _entry_points()
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none registered"
        raise ModelNotFoundError(
            f"unknown model {name!r}; known models: {known} (or pass package.module:factory)"
        )
    if len(eps[name]) > 1:
        where = ", ".join(ep.value for ep in eps[name])
        raise ModelSpecError(f"model {name!r} is registered more than once: {where}")
    ep = eps[name][0]
    try:
        obj = ep.load()
    except Exception as e:  # a broken plug-in must not look like an unknown name
        raise ModelSpecError(f"model {name!r}: loading entry point {ep.value} failed: {e}") from e
    spec = _as_spec(obj, f"entry point {name} = {ep.value}")
    if spec.name != name:
        raise ModelSpecError(
            f"entry point {name!r} = {ep.value} returned a spec named {spec.name!r}"
        )
    return spec
