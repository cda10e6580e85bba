"""Named accelerators for the planner's time model: memory, peak FLOP/s and memory bandwidth.

Recomputation is priced in time, not FLOPs: a roofline per operator,
``max(FLOPs / peak FLOP/s, bytes moved / bandwidth)``. FLOPs alone call a BatchNorm or a ReLU
free, when on every GPU it is bound by memory bandwidth and costs about as long as reading
and writing its tensors; a convolution of a RegNet stage is bound by arithmetic.

Figures are the vendors' dense (no sparsity) peaks for SXM parts: tensor-core FP16/BF16, and
FP32 without TF32 (PyTorch's default for matrix products). ``memory_bytes`` is what
``torch.cuda.get_device_properties(...).total_memory`` reports on the part, the default budget
of ``fsdpkit plan --gpu``. A roofline is an optimistic bound (no launch latency, perfect
overlap); it ranks plans, it does not predict wall time.
"""

from __future__ import annotations

from dataclasses import dataclass

from kitcore import FsdpkitError

__all__ = ["GPUS", "Device", "get_device", "roofline_seconds"]

MIB = 2**20


@dataclass(frozen=True, slots=True)
class Device:
    """An accelerator: ``memory_bytes`` (bytes), ``flops_16`` / ``flops_32`` (FLOP/s at
    FP16/BF16 and FP32), ``bandwidth`` (bytes/s of device memory)."""

    name: str
    memory_bytes: int
    flops_16: float
    flops_32: float
    bandwidth: float

    def peak_flops(self, dtype: str) -> float:
        return self.flops_32 if dtype in ("fp32", "fp64") else self.flops_16


GPUS: dict[str, Device] = {
    d.name: d
    for d in (
        Device("v100-32gb", 32_510 * MIB, 125e12, 15.7e12, 900e9),
        Device("a100-40gb", 40_536 * MIB, 312e12, 19.5e12, 1_555e9),
        Device("a100-80gb", 81_920 * MIB, 312e12, 19.5e12, 2_039e9),
        Device("h100-80gb", 81_559 * MIB, 989e12, 67e12, 3_350e9),
        Device("h200", 143_771 * MIB, 989e12, 67e12, 4_800e9),
    )
}

DEFAULT_GPU = "h100-80gb"


def get_device(name: str) -> Device:
    """The named device; a one-line error listing the names otherwise."""
    try:
        return GPUS[name]
    except KeyError:
        raise FsdpkitError(f"unknown GPU {name!r}; choose from {', '.join(GPUS)}") from None


def roofline_seconds(flops: float, bytes_moved: float, device: Device, dtype: str) -> float:
    """Lower bound on one operator's time (seconds): compute- or bandwidth-bound."""
    return max(flops / device.peak_flops(dtype), bytes_moved / device.bandwidth)
