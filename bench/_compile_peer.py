"""``torch.compile`` with ``torch._functorch.config.activation_memory_budget`` as a peer.

The min-cut partitioner's forward and backward graphs are captured as they are made and
priced by :func:`_roofline.graph_cost`; bytes saved for backward are read by a pack hook
around the compiled call. ``kind="partition"`` runs those graphs eagerly (inductor's
decompositions and partitioner, no C++ code generation: a cold inductor compile took 3-5 min
per setting for tiny on 2 busy cores), so peaks and times are upper bounds for inductor's;
``kind="inductor"`` compiles them.
"""

from __future__ import annotations

import time

import torch
from _roofline import graph_cost

from planner.devices import Device
from planner.measure import sgd, training_step


def make_backend(kind: str, graphs: dict, device: Device):
    def record(gm, backward: bool) -> None:
        flops, seconds = graph_cost(gm, device)
        key = "bw" if backward else "fw"
        graphs[f"{key}_flops"] += flops
        graphs[f"{key}_roofline_s"] += seconds

    if kind == "inductor":
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def inner(gm, inputs, **kw):
            record(gm, bool(kw.get("is_backward")))
            return compile_fx_inner(gm, inputs, **kw)

        return lambda gm, ex: compile_fx(gm, ex, inner_compile=inner)
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    def compiler(backward: bool):
        def comp(gm, _inputs):
            record(gm, backward)
            return make_boxed_func(gm.forward)

        return comp

    return aot_autograd(
        fw_compiler=compiler(False), bw_compiler=compiler(True),
        partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table(),
    )  # fmt: skip


def compile_row(spec, batch: int, act_budget: float, kind: str, measure, device: Device) -> dict:
    """One ``activation_memory_budget`` setting: compile, then ``measure(step, model, opt,
    inputs)`` (the bench's allocator peak and step time) and the graphs' costs."""
    import torch._functorch.config as fcfg

    torch._dynamo.reset()
    fcfg.activation_memory_budget = act_budget
    fcfg.enable_autograd_cache = False  # the partition must run, so its graphs are seen
    graphs = dict.fromkeys(("fw_flops", "bw_flops", "fw_roofline_s", "bw_roofline_s"), 0)
    try:
        torch.manual_seed(0)
        model = spec.build_model(torch.device("cpu")).train()
        opt = sgd(model, 1e-5)
        inputs = spec.example_input(batch, torch.device("cpu"))
        compiled = torch.compile(model, backend=make_backend(kind, graphs, device))
        step = training_step(spec, compiled, opt, inputs)
        t = time.perf_counter()
        step()  # compiles forward and backward
        compile_s = time.perf_counter() - t
        saved: dict[int, int] = {}

        def pack(x):
            saved[x.untyped_storage()._cdata] = x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = spec.training_loss(compiled(inputs))
        loss.backward()
        opt.zero_grad(set_to_none=True)
        del loss
        row = measure(step, model, opt, inputs)
    finally:
        fcfg.activation_memory_budget = 1.0
    return {"method": f"compile amb={act_budget:g}", "activation_memory_budget": act_budget,
            "compile_s": compile_s, "saved_bytes": sum(saved.values()), **graphs,
            "flops": graphs["fw_flops"] + graphs["bw_flops"],
            "roofline_s": graphs["fw_roofline_s"] + graphs["bw_roofline_s"], **row}  # fmt: skip
