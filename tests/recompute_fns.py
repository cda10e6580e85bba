"""What a backward runs: torch's FLOP formulas over every operator it dispatches, for tests
that hold the planner's recompute FLOPs to what training runs again."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from fsdpkit import apply_ac


class DispatchedFlops(TorchDispatchMode):
    """torch's FLOP formulas over every operator dispatched inside."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        count = flop_registry.get(func._overloadpacket)
        self.total += count(*args, **(kwargs or {}), out_val=out) if count else 0
        return out


def backward_flops(spec, plan=None, batch: int = 2) -> tuple[int, list[torch.Tensor]]:
    """One float64 step of ``spec`` under ``plan`` (None: plain): the FLOPs its backward
    dispatches and the parameters' gradients."""
    torch.manual_seed(0)
    model = spec.build_model("cpu").double().train()
    if plan is not None:
        apply_ac(model, plan)
    x = spec.example_input(batch, torch.device("cpu"))
    x = x.double() if torch.is_tensor(x) else [c.double() for c in x]
    loss = spec.training_loss(model(x))
    with DispatchedFlops() as counter:
        loss.backward()
    return counter.total, [p.grad for p in model.parameters()]
