"""Per-rank bodies for the DCP-in tests: the tiny preset sharded by fsdpkit (FSDP2) with AdamW,
saved by ``torch.distributed.checkpoint.save``; slices loaded on other world sizes."""

import torch
import torch.distributed.checkpoint as dcp
from ckpt_fns import _step
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor

from ckpt import load_sliced
from fsdpkit import FSDPPolicy, get_model_spec, parallelize


def _setup(seed=0):
    spec = get_model_spec("tiny")
    torch.manual_seed(seed)
    model = spec.build_model("cpu")
    units = [m for _, m in spec.named_units(model)]
    parallelize(model, units=units, policy=FSDPPolicy(fp32_modules=("head", "prototypes")))
    # AdamW: a replicated float32 ``step`` per parameter, which DCP may put in any rank's file
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    return spec, model, opt


def _full(t):
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def snapshot(model, opt):
    """Full tensors: the model's state dict and the optimizer state as ``<param>/<key>``."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = {f"{names[id(p)]}/{k}": _full(v) for p, s in opt.state.items()
             for k, v in s.items() if torch.is_tensor(v)}  # fmt: skip
    return {n: _full(t) for n, t in model.state_dict().items()}, state


def train_and_save_dcp(path, steps=2):
    """Train ``steps`` steps, save model and optimizer by name (DCP's recommended form)."""
    spec, model, opt = _setup()
    for step in range(steps):
        _step(spec, model, opt, step)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    return snapshot(model, opt)


def load_slices(path):
    """Load slices (with the optimizer) into a fresh model sharded over this world size; a seed
    other than the saver's, so that an unloaded tensor would differ."""
    _, model, opt = _setup(seed=1)
    load_sliced(path, model, opt)
    return snapshot(model, opt)
