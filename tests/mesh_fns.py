"""Per-rank bodies for the checkpoint-on-a-mesh tests (HSDP, sub-meshes, refused placements)."""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from ckpt import CheckpointError, load_sharded, load_sliced, save_sharded


class Net(nn.Module):
    """Rows that do not split evenly (5 and 3 over 2 shards; 1 over 2 or 4: empty shards), a
    buffer, float64 throughout."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 10), nn.Linear(10, 5), nn.Linear(5, 3),
                                     nn.Linear(3, 1)])  # fmt: skip
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 6, dtype=torch.float64))

    def forward(self, x):
        x = x * self.scale
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


def build(mesh=None, seed=0):
    """Net and AdamW; sharded per layer and at the root on ``mesh`` (FSDP2; a 2-D mesh: HSDP),
    whole without one."""
    torch.manual_seed(seed)
    model = Net().double()
    if mesh is not None:
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt


def _hsdp():
    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))


def train(model, opt, steps, first=0, per_rank=True):
    for step in range(first, first + steps):
        seed = 100 * step + (dist.get_rank() if per_rank and dist.is_initialized() else 0)
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()


def _full(t):
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _local(t):
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def state(model, opt, view=_full):
    """Parameters, buffers and optimizer state by name (``view``: full or local tensors)."""
    out = {f"param/{n}": view(p) for n, p in model.named_parameters()}
    out |= {f"buffer/{n}": view(b) for n, b in model.named_buffers()}
    for n, p in model.named_parameters():
        for k, v in opt.state[p].items():
            out[f"optim/{n}/{k}"] = view(v) if isinstance(v, torch.Tensor) else v
    return out


def same(a, b):
    """Names whose values differ (bitwise), or that one side lacks."""
    bad = sorted(a.keys() ^ b.keys())
    for k in a.keys() & b.keys():
        x, y = a[k], b[k]
        equal = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        if not equal:
            bad.append(k)
    return bad


def hsdp_save_and_load(path):
    """HSDP on a 2×2 mesh: train, save; load into a fresh HSDP model (its local pieces, and
    one more step, bitwise equal) and into 1-D FSDP over the 4 ranks (another layout)."""
    mesh = _hsdp()
    model, opt = build(mesh)
    train(model, opt, 2)
    placements = {tuple(p.placements) for p in model.parameters()}
    assert placements == {(Replicate(), Shard(0))}, placements
    save_sharded(path, model, opt, step=2, extra={"mesh": "2x2"})
    fresh, fresh_opt = build(mesh, seed=1)
    manifest = load_sharded(path, fresh, fresh_opt)
    assert manifest["step"] == 2 and manifest["extra"] == {"mesh": "2x2"}
    local_diff = same(state(model, opt, _local), state(fresh, fresh_opt, _local))
    full = state(model, opt)
    flat, flat_opt = build(init_device_mesh("cpu", (4,)), seed=2)
    load_sharded(path, flat, flat_opt)
    flat_diff = same(full, state(flat, flat_opt))
    train(model, opt, 1, first=2)
    train(fresh, fresh_opt, 1, first=2)
    step_diff = same(state(model, opt, _local), state(fresh, fresh_opt, _local))
    return full, local_diff, flat_diff, step_diff


def load_slices(path, layout):
    """Load slices (with optimizer state) into a model on ``layout``: ``"hsdp"`` (2×2) or
    ``"fsdp"`` (1-D over the world); the full state."""
    mesh = _hsdp() if layout == "hsdp" else init_device_mesh("cpu", (dist.get_world_size(),))
    model, opt = build(mesh, seed=3)
    load_sliced(path, model, opt)
    return state(model, opt)


def submesh_save_and_load(path):
    """FSDP2 on ``mesh["shard"]``: each replica group its own 1-D mesh (placements
    ``(Shard(0),)``), trained on the same data, so both groups hold the same values. Save; load
    into a fresh model on the same sub-meshes; the local pieces bitwise equal."""
    mesh = _hsdp()["shard"]
    model, opt = build(mesh)
    train(model, opt, 2, per_rank=False)
    assert {tuple(p.placements) for p in model.parameters()} == {(Shard(0),)}
    save_sharded(path, model, opt, step=2)
    fresh, fresh_opt = build(mesh, seed=1)
    load_sharded(path, fresh, fresh_opt)
    return same(state(model, opt, _local), state(fresh, fresh_opt, _local)), state(model, opt)


class _One(nn.Module):
    def __init__(self, weight) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def refused(path, kind):
    """save_sharded of a parameter with a placement ckpt does not save; the error's text."""
    full = torch.arange(24, dtype=torch.float64).view(4, 6)
    if kind == "shard1":
        weight = distribute_tensor(full, init_device_mesh("cpu", (2,)), [Shard(1)])
    elif kind == "two_shards":
        weight = distribute_tensor(full, init_device_mesh("cpu", (1, 2)), [Shard(0), Shard(0)])
    else:  # partial sums
        weight = DTensor.from_local(full / 2, init_device_mesh("cpu", (2,)), [Partial()])
    try:
        save_sharded(path, _One(weight), step=0)
    except CheckpointError as e:
        return str(e)
    return None
