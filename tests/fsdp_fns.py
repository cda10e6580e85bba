"""Per-rank bodies for the FSDP wrapper tests."""

from collections import Counter

import torch
import torch.distributed as dist

from fsdpkit import CommCounter, FSDPPolicy, get_model_spec, parallelize
from kitcore import DTYPES

B_LOCAL = 2  # images per rank


class Plan:
    def __init__(self, units, segments, selective=()):
        self.units, self.segments, self.selective = units, segments, selective


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _fsdp_ops(counter) -> dict:
    """FSDP2's collectives only: SyncBatchNorm's statistics use all_gather/all_reduce lists."""
    ops = Counter(op for _, op, _, _ in counter.calls)
    # SyncBatchNorm's backward all-reduces have 2·C elements; the BN gradient bucket is larger
    big = sum(1 for kind, op, n, _ in counter.calls if op == "allreduce_" and n > 2 * 96)
    return {
        "all_gather": ops["_allgather_base_"],
        "reduce_scatter": ops["_reduce_scatter_base_"],
        "bn_all_reduce": big,
    }


def _batches(spec, world, steps):
    torch.manual_seed(3)
    return [spec.example_input(B_LOCAL * world, torch.device("cpu")) for _ in range(steps)]


def _rank_slice(crops, rank):
    return [c[rank * B_LOCAL : (rank + 1) * B_LOCAL] for c in crops]


# Equivalence checks run in float64: sharding changes the reduction order (per-rank partial
# sums, reduce-scatter), which moves FP32 results by ~1e-5 on some CPUs and not on others;
# in float64 the same reordering stays near 1e-13, so a tolerance of 1e-9 is CPU-independent
# and still far below any real bug (a gradient mis-averaged by 1e-6 is caught: see the tests).
FP64 = {"param_dtype": "fp64", "reduce_dtype": "fp64"}


def _max_rel_err(got, want) -> float:
    """Largest per-tensor max|a - b| / max|b| (tensors that are all zero: absolute)."""
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-3)).item()
               for a, b in zip(got, want, strict=True))  # fmt: skip


def _skew_grads(model, rank, factor):
    """A deliberate bug for the tests' own check: scale this rank's local gradients."""
    if factor is not None and dist.get_rank() == rank:
        for p in model.parameters():
            if p.grad is not None:
                _local(p.grad).mul_(factor)


def sharded_matches_single(segments, steps=5, policy_kw=None, skew=None, selective=()):
    """FSDP (+ SyncBN, + plan; ``selective`` units under op-level selective checkpointing) on
    this rank's slice vs one process on the whole batch, both in float64: parameters and
    BatchNorm running statistics. ``skew=(rank, factor)`` scales one rank's sharded gradients
    after backward (a planted bug, to show the tolerance catches it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = get_model_spec("tiny")
    torch.manual_seed(0)
    ref = spec.build_model("cpu").double()
    model = spec.build_model("cpu").double()
    model.load_state_dict(ref.state_dict())
    names = tuple(n for n, _ in spec.named_units(model))
    policy = FSDPPolicy(fp32_modules=("head", "prototypes"), **FP64, **(policy_kw or {}))
    parallelize(model, plan=Plan(names, segments, selective), policy=policy)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    losses, ref_losses, comm = [], [], []
    for crops in _batches(spec, world, steps):
        crops = [c.double() for c in crops]
        opt.zero_grad()
        with CommCounter() as fwd:
            loss = spec.training_loss(model(_rank_slice(crops, rank)))
        with CommCounter() as bwd:
            loss.backward()
        _skew_grads(model, *(skew or (None, None)))
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
        comm.append((_fsdp_ops(fwd), _fsdp_ops(bwd)))
        ref_opt.zero_grad()
        ref_loss = spec.training_loss(ref(crops))
        ref_loss.backward()
        ref_opt.step()
        ref_losses.append(ref_loss.item())
    params = [_full(p) for p in model.parameters()]
    assert all(p.dtype == torch.float64 for p in params)
    buffers = [b.double() for b in model.buffers()]  # running statistics, batch counters
    err = _max_rel_err(params + buffers, [*ref.parameters(), *(b.double() for b in ref.buffers())])
    return losses, ref_losses, err, comm, sharded_units(model)


def sharded_matches_single_and_catches_a_skew(segments, steps, policy_kw, skew):
    """:func:`sharded_matches_single` as is, then with ``skew`` planted, in one process group."""
    return (sharded_matches_single(segments, steps, policy_kw),
            sharded_matches_single(segments, steps, policy_kw, skew))  # fmt: skip


def sharded_units(model) -> int:
    """FSDP modules that own parameters directly (not through a nested FSDP module)."""
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    count = 0
    for m in fsdp:
        nested = {id(p) for sub in m.modules() if sub is not m and sub in fsdp
                  for p in sub.parameters()}  # fmt: skip
        count += any(id(p) not in nested for p in m.parameters())
    return count


def mixed_precision_runs(runs, steps=4):
    """:func:`mixed_precision_training` for each ``(param_dtype, rounded_to)``, one group."""
    return [mixed_precision_training(d, None, steps, r)[0] for d, r in runs]


def _sharded_tiny(segments, param_dtype):
    spec = get_model_spec("tiny")
    torch.manual_seed(0)
    model = spec.build_model("cpu")
    names = tuple(n for n, _ in spec.named_units(model))
    policy = FSDPPolicy(fp32_modules=("head", "prototypes"), param_dtype=param_dtype)
    parallelize(model, plan=Plan(names, segments), policy=policy)
    return spec, model


def one_step_collectives(segments, param_dtype):
    """One training step of tiny: FSDP2 all-gather bytes per call in forward and backward."""
    rank, world = dist.get_rank(), dist.get_world_size()
    spec, model = _sharded_tiny(segments, param_dtype)
    crops = _rank_slice(_batches(spec, world, 1)[0], rank)
    with CommCounter() as fwd:
        loss = spec.training_loss(model(crops))
    with CommCounter() as bwd:
        loss.backward()
    return _gather_bytes(fwd), _gather_bytes(bwd), loss.item()


def _gather_bytes(counter) -> list[int]:
    return [b for _, op, _, b in counter.calls if op == "_allgather_base_"]


def low_precision_setup(model, param_dtype: str, rounded_to: str | None):
    """For the mixed-precision runs: round ``model``'s (local) parameters to ``rounded_to``
    and back when given (the noise-floor reference), then SGD with momentum and a GradScaler
    enabled for fp16. Returns ``(the rounding dtype or None, optimizer, scaler)``."""
    low = DTYPES[rounded_to] if rounded_to else None
    if low is not None:
        with torch.no_grad():
            for p in model.parameters():
                _local(p).copy_(_local(p).to(low))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=param_dtype == "fp16")
    return low, opt, scaler


def mixed_precision_training(param_dtype, inf_rank=None, steps=4, rounded_to=None):
    """Losses of a few steps in ``param_dtype`` (fp16 with GradScaler); optionally an inf in
    one rank's gradients at step 1. Returns the losses and whether each step was taken.

    ``rounded_to`` (``fp16``/``bf16``): round the initial parameters and the images to that
    dtype (and back), then train as ``param_dtype`` does; in FP32 this is the noise floor of
    training in that dtype: what merely representing the problem in it changes."""
    rank, world = dist.get_rank(), dist.get_world_size()
    spec, model = _sharded_tiny(((0, 3, True), (3, 6, False)), param_dtype)
    low, opt, scaler = low_precision_setup(model, param_dtype, rounded_to)
    losses, taken = [], []
    for step, crops in enumerate(_batches(spec, world, steps)):
        if low is not None:
            crops = [c.to(low).float() for c in crops]
        opt.zero_grad()
        loss = spec.training_loss(model(_rank_slice(crops, rank)))
        scaler.scale(loss).backward()
        if step == 1 and rank == inf_rank:
            p = next(iter(model.parameters()))
            _local(p.grad).view(-1)[0] = float("inf")
        before = [_local(p).clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        taken.append(any(not torch.equal(a, _local(p))
                         for a, p in zip(before, model.parameters(), strict=True)))  # fmt: skip
        total = loss.detach().float().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses, taken


def sharded_state_bytes():
    """Bytes of parameter, gradient and momentum storage on this rank after one step; the full
    model's bytes; the worst-case padding of dim-0 sharding; and the bytes kept whole on every
    rank (replicated BatchNorm parameters)."""
    from planner.tracker import tensor_storages

    world = dist.get_world_size()
    spec = get_model_spec("rg8gf")
    torch.manual_seed(0)
    model = spec.build_model("cpu")
    full = sum(p.numel() * 4 for p in model.parameters())
    pad = sum(-p.shape[0] % world * p[0].numel() * 4 for p in model.parameters() if p.dim())
    names = tuple(n for n, _ in spec.named_units(model))
    parallelize(model, plan=Plan(names, ((0, len(names), False),)),
                policy=FSDPPolicy(fp32_modules=("head", "prototypes")))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():  # a step needs gradients, not a (slow) rg8gf backward
        p.grad = torch.zeros_like(p)
    opt.step()
    local = [_local(p) for p in model.parameters()]
    grads = [_local(p.grad) for p in model.parameters()]
    bufs = [_local(opt.state[p]["momentum_buffer"]) for p in model.parameters()]
    used = [sum(s.nbytes() for s in tensor_storages(ts)) for ts in (local, grads, bufs)]
    whole = sum(p.numel() * 4 for p in model.parameters() if not hasattr(p, "to_local"))
    return used, full, pad, whole


def vit_profile_plan_train(steps=3):
    """The test ViT through profile → plan → parallelize → training, vs one process."""
    from planner import MemoryConfig, estimate, plan_checkpoints, profile_model

    rank, world = dist.get_rank(), dist.get_world_size()
    spec = get_model_spec("toy_models:vit_spec")
    policy = FSDPPolicy(**FP64)  # the plan is made for the setup it runs in (checked)
    prof = profile_model(spec, 4, dtype="fp64")
    cfg = MemoryConfig.from_policy(policy, world)
    n = len(prof.units)
    budget = estimate(prof, [(0, n, False)], cfg).peak_bytes - 1  # force some checkpointing
    plan = plan_checkpoints(prof, budget, cfg)
    torch.manual_seed(0)
    ref = spec.build_model("cpu").double()
    model = spec.build_model("cpu").double()
    model.load_state_dict(ref.state_dict())
    parallelize(model, plan=plan, policy=policy)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(steps):
        x = torch.randn(4 * world, 3, 32, 32, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        loss = spec.training_loss(model(x[rank * 4 : (rank + 1) * 4]))
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        ref_opt.zero_grad()
        ref_loss = spec.training_loss(ref(x))
        ref_loss.backward()
        ref_opt.step()
        losses.append((total.item() / world, ref_loss.item()))
    err = _max_rel_err([_full(p) for p in model.parameters()], list(ref.parameters()))
    return losses, err, plan.choices()


def replicated_bn_grads_after_meta_init():
    """Build on meta, parallelize, then ``to_empty`` (new BatchNorm parameter objects): are
    BatchNorm gradients still averaged over ranks?"""
    from seer_train.models import init_weights

    spec = get_model_spec("tiny")
    model = spec.build_model("meta")
    units = list(spec.units(model))
    parallelize(model, units=units, policy=FSDPPolicy(batchnorm="replicate"))
    model.to_empty(device="cpu")
    init_weights(model)
    torch.manual_seed(dist.get_rank())
    _, scores = model(spec.example_input(2, torch.device("cpu")))
    scores.square().mean().backward()
    bn = model.trunk.units[0].bn
    grads = torch.cat([bn.weight.grad, bn.bias.grad])
    parts = [torch.empty_like(grads) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, grads)
    return all(torch.equal(parts[0], p) for p in parts)
