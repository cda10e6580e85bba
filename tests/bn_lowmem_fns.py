"""Per-rank bodies for the low-memory BatchNorm tests (tests/test_bn_lowmem.py).

Each also runs in the test process itself without a process group (world size 1).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fsdp_fns import low_precision_setup
from torch.nn.modules.batchnorm import _BatchNorm

from fsdpkit import FSDPPolicy, get_model_spec, parallelize, syncbn
from fsdpkit.syncbn import BatchNormFn

EPS = 1e-5
KEYS = ("out", "dx", "dw", "db", "running_mean", "running_var")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _global(batch_sizes, channels, spatial, seed=0):
    """The whole batch every rank builds alike: input (mean ≈ 1, std ≈ 3) and upstream grad."""
    gen = torch.Generator().manual_seed(seed)
    shape = (sum(batch_sizes), channels, *spatial)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1
    r = torch.randn(shape, generator=gen, dtype=torch.float64)
    stats = (torch.randn(channels, generator=gen, dtype=torch.float64) * 0.1,
             1 + torch.rand(channels, generator=gen, dtype=torch.float64))  # fmt: skip
    return x, r, stats


# --- CPU stand-ins for torch's CUDA-only kernels, with the semantics of their CUDA versions
# (aten/src/ATen/native/cuda/Normalization.cuh): the tests run the fused code path with them.


def _acc(t):
    return torch.promote_types(t.dtype, torch.float32)


def _dims(t):
    return [0, *range(2, t.dim())]


def _v(c, t):
    return c.view([1, -1] + [1] * (t.dim() - 2))


def _dense(t):
    fmts = [torch.contiguous_format] + ([torch.channels_last] if t.dim() == 4 else [])
    assert any(t.is_contiguous(memory_format=f) for f in fmts), "kernel given a strided tensor"


def _fake_stats(x, eps):
    _dense(x)
    xf = x.to(_acc(x))
    mean = xf.mean(_dims(x))
    var = (xf - _v(mean, x)).square().mean(_dims(x))
    zero = (var == 0) & (eps == 0)
    invstd = torch.where(zero, torch.zeros_like(var), (var + eps).rsqrt())
    return mean, invstd


def _fake_elemt(x, weight, bias, mean, invstd, eps):
    _dense(x)
    assert mean.dtype == invstd.dtype == _acc(x)
    y = (x.to(mean.dtype) - _v(mean, x)) * _v(invstd, x)
    if weight is not None:
        y = y * _v(weight, x)
    if bias is not None:
        y = y + _v(bias, x)
    return y.to(x.dtype)


def _fake_backward_reduce(dy, x, mean, invstd, weight, input_g, weight_g, bias_g):
    _dense(dy)
    dyf, xmu = dy.to(mean.dtype), x.to(mean.dtype) - _v(mean, x)
    sum_dy, sum_dy_xmu = dyf.sum(_dims(x)), (dyf * xmu).sum(_dims(x))
    return (sum_dy if input_g else None, sum_dy_xmu if input_g else None,
            sum_dy_xmu * invstd if weight_g else None, sum_dy if bias_g else None)  # fmt: skip


def _fake_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    assert count.dtype == torch.int32
    n = count.sum().to(mean.dtype)
    f2 = invstd if weight is None else invstd * weight
    f1 = invstd.square() * sum_dy_xmu / n
    xmu = x.to(mean.dtype) - _v(mean, x)
    return ((dy.to(mean.dtype) - _v(sum_dy / n, x) - xmu * _v(f1, x)) * _v(f2, x)).to(x.dtype)


@contextlib.contextmanager
def _patched(fused_fakes: bool = False, planted: bool = False):
    """``fused_fakes``: take the CUDA code path on CPU, with the stand-ins above.
    ``planted``: a deliberate bug for the tests' own check: all arithmetic (statistics
    included) in the input's dtype instead of FP32."""
    saved = []

    def put(obj, name, value):
        saved.append((obj, name, getattr(obj, name, None)))
        setattr(obj, name, value)

    if fused_fakes:
        put(syncbn, "_use_fused_kernels", lambda x: x.numel() > 0)
        put(torch, "batch_norm_stats", _fake_stats)
        put(torch, "batch_norm_elemt", _fake_elemt)
        put(torch, "batch_norm_backward_reduce", _fake_backward_reduce)
        put(torch, "batch_norm_backward_elemt", _fake_backward_elemt)
    if planted:
        put(syncbn, "_at_least_fp32", lambda dtype: dtype)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _bn_functional(x, r, stats, weight, bias, momentum, dtype):
    """F.batch_norm in ``dtype`` on ``x`` (upstream gradient ``r``), parameters in ``dtype``."""
    x = x.detach().clone().to(dtype).requires_grad_()
    w = None if weight is None else weight.detach().clone().to(dtype).requires_grad_()
    b = None if bias is None else bias.detach().clone().to(dtype).requires_grad_()
    rm, rv = stats[0].to(dtype).clone(), stats[1].to(dtype).clone()
    out = F.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum, eps=EPS)
    (out * r.to(dtype)).sum().backward()
    return {"out": out.detach(), "dx": x.grad, "dw": None if w is None else w.grad,
            "db": None if b is None else b.grad, "running_mean": rm, "running_var": rv}  # fmt: skip


def bn_vs_functional(batch_sizes, dtype=torch.float64, *, channels=3, spatial=(5, 4),
                     momentum=0.1, affine=True, fused_fakes=False, planted=False):  # fmt: skip
    """:class:`BatchNormFn` on this rank's rows of the global batch vs ``F.batch_norm`` on all
    of it, in float64, on the input and upstream gradient rounded to ``dtype``.

    Returns, per key of :data:`KEYS`, the max abs error of ours (``err``) and, for ``dtype``
    below float64, the noise floor (``floor``: an FP32 ``F.batch_norm`` on the same rounded
    data, its ``dtype``-typed results (out, dx) rounded to ``dtype``, against the float64
    reference) and the reference's magnitude (``scale``); the bytes of every tensor saved for
    backward; the dtypes of the results."""
    rank, world = _rank_world()
    assert len(batch_sizes) == world
    x, r, stats = _global(batch_sizes, channels, spatial)
    xr, rr = x.to(dtype).double(), r.to(dtype).double()  # what a dtype layer is given
    start = sum(batch_sizes[:rank])
    mine = slice(start, start + batch_sizes[rank])
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.linspace(-1.0, 2.0, channels, dtype=torch.float64) if affine else None
    bias = torch.linspace(0.5, -0.25, channels, dtype=torch.float64) if affine else None

    xl = x[mine].clone().to(dtype).requires_grad_()
    w = None if weight is None else weight.clone().to(pdtype).requires_grad_()
    b = None if bias is None else bias.clone().to(pdtype).requires_grad_()
    rm, rv = stats[0].to(pdtype).clone(), stats[1].to(pdtype).clone()
    saved = []

    def pack(t):
        saved.append((str(t.dtype), t.numel() * t.element_size()))
        return t

    with _patched(fused_fakes, planted):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = BatchNormFn.apply(xl, w, b, rm, rv, EPS, momentum, None, world)
        (out.double() * r[mine]).sum().backward()
    got = {"out": out.detach(), "dx": xl.grad, "running_mean": rm, "running_var": rv}
    if affine:
        grads = torch.cat([w.grad, b.grad]).double()
        if world > 1:
            dist.all_reduce(grads)  # data parallelism averages; the sum is the global gradient
        got["dw"], got["db"] = grads[:channels], grads[channels:]
    result = {"saved": saved, "x_bytes": xl.numel() * xl.element_size(), "world": world,
              "dtypes": {k: str(got[k].dtype) for k in ("out", "dx")} | (
                  {"dw": str(w.grad.dtype)} if affine else {})}  # fmt: skip

    ref = _bn_functional(xr, rr, stats, weight, bias, momentum, torch.float64)
    keys = [k for k in KEYS if ref[k] is not None]

    def own(k, t):
        return t[mine] if k in ("out", "dx") else t

    result["err"] = {k: (got[k].double() - own(k, ref[k])).abs().max().item() for k in keys}
    if dtype != torch.float64:
        f32 = _bn_functional(xr, rr, stats, weight, bias, momentum, torch.float32)
        for k in ("out", "dx"):
            f32[k] = f32[k].to(dtype)
        result["floor"] = {k: (f32[k].double() - ref[k]).abs().max().item() for k in keys}
        result["scale"] = {k: ref[k].abs().max().item() for k in keys}
    return result


# --- FSDP2: what a BatchNorm inside a sharded model keeps for backward


class Plan:
    def __init__(self, units, segments):
        self.units, self.segments = units, segments


def _record_bn_calls(model):
    """Per BatchNorm call: input dtype and bytes, output dtype, bytes of each saved tensor."""
    calls, stack = [], []

    def pre(m, args):
        x = args[0]
        stack.append({"C": m.num_features, "in_dtype": str(x.dtype),
                      "in_bytes": x.numel() * x.element_size(), "saved": []})  # fmt: skip

    def post(m, args, out):
        rec = stack.pop()
        rec["out_dtype"] = str(out.dtype)
        calls.append(rec)

    def pack(t):
        if stack:
            stack[-1]["saved"].append((str(t.dtype), t.numel() * t.element_size()))
        return t

    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post)
    return calls, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def sharded_tiny_bn(param_dtype, batchnorm, steps=2, rounded_to=None, record=True):
    """Train the sharded tiny model (2 images per rank, nothing checkpointed) for ``steps``
    SGD steps in ``param_dtype`` with BatchNorm mode ``batchnorm``. ``rounded_to``: round the
    initial parameters and the images to that dtype first (FP32 on them is the noise floor of
    training in that dtype). Returns the losses (mean over ranks) and, with ``record``, every
    BatchNorm call of the first forward (see :func:`_record_bn_calls`)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = get_model_spec("tiny")
    torch.manual_seed(0)
    model = spec.build_model("cpu")
    names = tuple(n for n, _ in spec.named_units(model))
    policy = FSDPPolicy(fp32_modules=("head", "prototypes"), param_dtype=param_dtype,
                        batchnorm=batchnorm)  # fmt: skip
    parallelize(model, plan=Plan(names, ((0, len(names), False),)), policy=policy)
    calls, hooks = _record_bn_calls(model)
    low, opt, scaler = low_precision_setup(model, param_dtype, rounded_to)
    torch.manual_seed(3)
    batches = [spec.example_input(2 * world, torch.device("cpu")) for _ in range(steps)]
    losses, first = [], []
    for step, crops in enumerate(batches):
        if low is not None:
            crops = [c.to(low).float() for c in crops]
        crops = [c[rank * 2 : (rank + 1) * 2] for c in crops]
        opt.zero_grad()
        with hooks if (record and step == 0) else contextlib.nullcontext():
            loss = spec.training_loss(model(crops))
        if step == 0:
            first = list(calls)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        total = loss.detach().float().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses, first if record else []


def tiny_bn_runs(runs, steps=2):
    """:func:`sharded_tiny_bn` for each ``(param_dtype, batchnorm, rounded_to)``, one group."""
    return [sharded_tiny_bn(d, bn, steps, r, record=r is None) for d, bn, r in runs]
