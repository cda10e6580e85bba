"""Byte sizes for humans (``parse_bytes("40GiB")``, ``format_bytes(42949672960)``) and the one
table of training dtypes by name (``DTYPES``), used by the planner, the wrapper and the CLIs."""

from __future__ import annotations

import re

import torch

from .errors import FsdpkitError

__all__ = ["DTYPES", "dtype_of", "format_bytes", "parse_bytes"]

# Training precisions by the names every CLI and config uses (fp64: numerical reference runs).
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp64": torch.float64,
}


def dtype_of(name: str, what: str = "dtype") -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``; a one-line error naming the choices otherwise."""
    if name not in DTYPES:
        raise FsdpkitError(f"{what} {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


_UNITS = {
    "": 2**30,  # a bare number is GiB: the unit GPU memory is quoted in
    "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int | float, what: str = "size") -> int:
    """``"40GiB"``, ``"40 GB"``, ``"512MiB"``, ``"40"`` (GiB) → bytes. One-line error otherwise."""
    if isinstance(text, int | float):
        return int(text)
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise FsdpkitError(f"{what} {text!r} is not a size; use e.g. 40GiB, 80GB, 512MiB or 40")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Binary units with three significant digits: ``"39.9 GiB"``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"
