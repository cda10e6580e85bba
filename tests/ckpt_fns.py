"""Per-rank bodies for the checkpoint tests."""

import torch
import torch.distributed as dist

from ckpt import load_sharded, save_sharded
from fsdpkit import FSDPPolicy, get_model_spec, parallelize


def _setup(fp64=False):
    """tiny, sharded; ``fp64``: in float64, for comparisons across world sizes (a different
    reduction order moves float64 results at round-off, FP32 ones at CPU-dependent ~1e-6)."""
    spec = get_model_spec("tiny")
    torch.manual_seed(0)
    model = spec.build_model("cpu")
    dtypes = {}
    if fp64:
        model.double()
        dtypes = {"param_dtype": "fp64", "reduce_dtype": "fp64"}
    units = [m for _, m in spec.named_units(model)]
    policy = FSDPPolicy(fp32_modules=("head", "prototypes"), **dtypes)
    parallelize(model, units=units, policy=policy)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return spec, model, opt


def _step(spec, model, opt, step):
    gen = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    crops = [torch.randn(2, 3, s, s, generator=gen) for s in (64, 64, 32, 32, 32, 32)]
    opt.zero_grad()
    loss = spec.training_loss(model(crops))
    loss.backward()
    opt.step()
    return loss.item()


def _params(model):
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for p in model.parameters()]  # fmt: skip


def train(steps, save_at=None, path=None):
    spec, model, opt = _setup()
    losses = []
    for step in range(steps):
        losses.append(_step(spec, model, opt, step))
        if save_at is not None and step + 1 == save_at:
            save_sharded(path, model, opt, step=save_at, extra={"note": "resume test"})
    return losses, _params(model)


def resume(path, first_step, steps):
    spec, model, opt = _setup()
    manifest = load_sharded(path, model, opt)
    assert manifest["step"] == first_step and manifest["extra"] == {"note": "resume test"}
    losses = [_step(spec, model, opt, step) for step in range(first_step, first_step + steps)]
    return losses, _params(model)


def train_and_save(path, steps=2):
    """Train on this world size, save with the unit names recorded; return full params."""
    spec, model, opt = _setup()
    for step in range(steps):
        _step(spec, model, opt, step)
    units = [n for n, _ in spec.named_units(model)] + ["head", "prototypes"]
    save_sharded(path, model, opt, step=steps, units=units)
    return _params(model)


def load_slices(path):
    """Load slices into a model sharded over this world size; full params and bytes read."""
    from ckpt import load_sliced

    _, model, opt = _setup()
    manifest = load_sliced(path, model, opt if manifest_has_optimizer(path) else None)
    return _params(model), manifest["bytes_read"]


def manifest_has_optimizer(path):
    import json
    from pathlib import Path

    return bool(json.loads((Path(path) / "manifest.json").read_text())["optimizer"])


def _global_step(spec, model, opt, step, global_batch=6):
    """One step on this rank's slice of a global batch that does not depend on world size."""
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(500 + step)
    crops = [torch.randn(global_batch, 3, s, s, generator=gen, dtype=torch.float64)
             for s in (64, 64, 32, 32, 32, 32)]  # fmt: skip
    crops = [c.to(next(model.parameters()).dtype) for c in crops]
    per = global_batch // world
    opt.zero_grad()
    loss = spec.training_loss(model([c[rank * per : (rank + 1) * per] for c in crops]))
    loss.backward()
    opt.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total.item() / world


def save_after(path, steps):
    spec, model, opt = _setup(fp64=True)
    for step in range(steps):
        _global_step(spec, model, opt, step)
    units = [n for n, _ in spec.named_units(model)] + ["head", "prototypes"]
    save_sharded(path, model, opt, step=steps, units=units)


def continue_from_sharded(path, first, steps):
    spec, model, opt = _setup(fp64=True)
    load_sharded(path, model, opt)
    return [_global_step(spec, model, opt, s) for s in range(first, first + steps)]


def continue_from_slices(path, first, steps):
    from ckpt import load_sliced

    spec, model, opt = _setup(fp64=True)
    load_sliced(path, model, opt)
    return [_global_step(spec, model, opt, s) for s in range(first, first + steps)]
