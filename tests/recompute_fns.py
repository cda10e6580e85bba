"""What a backward runs, counted by PyTorch's own ``FlopCounterMode`` (its FLOP formulas over
every operator dispatched), for tests that hold the planner's recompute FLOPs to what
training runs again."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from fsdpkit import apply_ac


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
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return counter.get_total_flops(), [p.grad for p in model.parameters()]
