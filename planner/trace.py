"""One training step under :class:`~planner.tracker.LiveMemory` with hooks at every unit
boundary (forward and backward): what :func:`planner.profile_model` records per unit."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._pytree import tree_leaves

from kitcore import ModelSpec

from .tracker import LiveMemory, storage_key, tensor_storages

__all__ = ["Trace", "total_bytes"]


class Trace:
    """One step under the tracker with hooks at unit boundaries (forward and backward)."""

    def __init__(self, tracker: LiveMemory, n: int, excluded: set[int]) -> None:
        self.t, self.n, self.excluded = tracker, n, excluded
        self.current: int | str = "pre"
        self.saved: dict[int | str, dict[int, int]] = {i: {} for i in [*range(n), "pre", "tail"]}
        self.inputs: list[dict[int, int]] = [{} for _ in range(n)]
        self.outputs: list[dict[int, int]] = [{} for _ in range(n)]
        self.fwd_peak = [0] * n
        self.bwd_peak = [0] * n
        self.later_outputs = [0] * n  # bytes of outputs after the first (multi-input calls)
        self.flops = [0] * n
        self.pre_peak = self.tail_fwd_peak = self.tail_bwd_peak = self.loss_bytes = 0
        self.pre_held = 0
        self.input_keys: set[int] = set()  # the model's input storages
        self.input_saved = False  # whether backward keeps one of them
        self._start = self._flops_at = 0
        self._bwd_unit = n  # unit whose backward runs now; n = the tail
        self.held_until = [-1] * n
        self.on_forward_done = None
        self.on_pack = None  # called with self.current whenever autograd saves a tensor
        self._input_refs: list[list[weakref.ref]] = [[] for _ in range(n)]
        # made by the model's code between unit i-1's forward and unit i's, still held when
        # unit i starts (not its input, not saved for backward), and until which unit's start
        self.between_held = [0] * n
        self.between_until = [-1] * n
        self._between_refs: list[list[weakref.ref]] = [[] for _ in range(n)]
        self._created_after = 0  # the tracker's serial when the last unit's forward ended

    def forward_unit(self) -> int | None:
        """The unit whose forward is running, or None."""
        return self.current if isinstance(self.current, int) else None

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.on_pack is not None:
            self.on_pack(self.current)
        st = t.untyped_storage()
        key = storage_key(st)
        if key not in self.excluded:
            self.saved[self.current][key] = st.nbytes()
        elif key in self.input_keys:
            self.input_saved = True
        return t

    def _storages(self, obj: Any) -> dict[int, int]:
        return {
            k: s.nbytes()
            for s in tensor_storages(obj)
            if (k := storage_key(s)) not in self.excluded
        }

    def pre_hook(self, i: int):
        def hook(_m, args):
            self.inputs[i] = self._storages(args)
            if i == 0:
                self.pre_peak = self.t.window_peak - self._start
                # what the code before unit 0 made and still holds, beyond unit 0's input
                # and what it saved for backward (an input cast, kept by a frame)
                made = self.t.live - self._start - total_bytes(self.inputs[0])
                self.pre_held = max(made - total_bytes(self.saved["pre"]), 0)
            self._note_held(i, args)
            if i > 0:
                self._note_between(i)
            self.current = i
            self._start = self.t.reset_window()
            self._flops_at = self.t.flops

        return hook

    def _note_held(self, i: int, args: Any) -> None:
        """Unit ``i`` starts: which earlier units' inputs are still alive (not as its input)."""
        mine = set(self.inputs[i])
        for j in range(i):
            alive = (r() for r in self._input_refs[j])
            if any(st is not None and storage_key(st) not in mine for st in alive):
                self.held_until[j] = i
        self._input_refs[i] = [
            weakref.ref(st) for st in tensor_storages(args) if storage_key(st) not in self.excluded
        ]

    def _note_between(self, i: int) -> None:
        """Unit ``i`` starts: what the code since unit ``i - 1`` ended made and still holds
        (e.g. transformers' Swin stage keeps a reshaped copy of its output through the next
        stage), and which earlier such tensors are still alive."""
        for j in range(1, i):
            if any(r() is not None for r in self._between_refs[j]):
                self.between_until[j] = i
        saved = set(self.saved["tail"])  # saves made between units are filed under the tail
        made = [
            st for st in self.t.made_since(self._created_after)
            if (k := storage_key(st)) not in self.inputs[i] and k not in saved
            and k not in self.excluded
        ]  # fmt: skip
        self.between_held[i] = sum(st.nbytes() for st in made)
        if made:
            self.between_until[i] = i
            self._between_refs[i] = [weakref.ref(st) for st in made]

    def post_hook(self, i: int):
        def hook(_m, _args, out):
            self.outputs[i] = self._storages(out)
            leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.later_outputs[i] = (
                total_bytes(self._storages(leaves[1:])) if len(leaves) > 1 else 0
            )
            self.fwd_peak[i] = self.t.window_peak - self._start
            self.flops[i] = self.t.flops - self._flops_at
            self.current = "tail"
            self._start = self.t.reset_window()
            self._created_after = self.t.created
            if torch.is_grad_enabled():
                # The first of this unit's output nodes to run marks the start of its backward:
                # by then every gradient of its output exists and the next unit's backward is
                # done (autograd runs later-created nodes first).
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                        t.grad_fn.register_prehook(self._enter_backward(i))

        return hook

    def _enter_backward(self, i: int):
        def hook(_grad_outputs):
            if self._bwd_unit <= i:
                return None
            self._close_backward_phase()
            self._bwd_unit = i
            self._start = self.t.reset_window()
            return None

        return hook

    def _close_backward_phase(self) -> None:
        peak = self.t.window_peak - self._start
        if self._bwd_unit == self.n:
            self.tail_bwd_peak = peak
        else:
            self.bwd_peak[self._bwd_unit] = peak

    def run(self, spec: ModelSpec, model: nn.Module, units, inputs: Any, grad: bool) -> int:
        """Run the step; returns the total FLOPs (forward, plus backward when ``grad``)."""
        handles = []
        for i, (_, unit) in enumerate(units):
            # after sharded_param_views' hook: a unit's input is what FSDP2's cast hands it
            handles.append(unit.register_forward_pre_hook(self.pre_hook(i)))
            handles.append(unit.register_forward_hook(self.post_hook(i)))
        try:
            with (
                self.t,
                saved_tensors_hooks(self.pack, lambda t: t),
                torch.set_grad_enabled(grad),
            ):
                self._start = self.t.reset_window()
                out = model(inputs)
                if not grad:
                    return self.t.flops
                loss = spec.training_loss(out)
                if self.on_forward_done is not None:
                    self.on_forward_done()
                self.loss_bytes = sum(st.nbytes() for st in tensor_storages(loss))
                self.tail_fwd_peak = self.t.window_peak - self._start
                del out
                self._start = self.t.reset_window()
                loss.backward()
                self._close_backward_phase()
                return self.t.flops
        finally:
            for h in handles:
                h.remove()


def total_bytes(d: Mapping[int, int], keys=None) -> int:
    """Sum of ``d``'s values (bytes per storage key), over ``keys`` if given."""
    return sum(v for k, v in d.items() if keys is None or k in keys)
