"""Streaming safetensors files with per-tensor CRC-32, and durable writes.

safetensors is an 8-byte little-endian header length, a JSON header (dtype, shape,
``data_offsets`` of every tensor) and the raw bytes. ``safetensors.torch.save_file`` builds
the whole file in memory first (one more copy of a rank's shard); this writer streams tensor by
tensor, checksums on the way out and fsyncs, and any safetensors reader opens the result.
CRC-32 (zlib) detects flipped bytes and truncation; it is not a defence against tampering.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fsdpkit import FsdpkitError

__all__ = [
    "CheckpointError",
    "crc32_of_range",
    "dim0_rows",
    "fsync_dir",
    "read_header",
    "write_safetensors",
]

_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_CHUNK = 64 << 20  # bytes hashed/read at a time


class CheckpointError(FsdpkitError):
    """A checkpoint that is incomplete, corrupt or does not fit the model: the message names the
    file and tensor at fault."""


def _raw(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_safetensors(
    path: Path, tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """Write ``tensors`` to ``path`` (fsynced); returns per tensor dtype, shape, byte range in
    the file (``offsets``, from the start of the file) and ``crc32``."""
    header: dict[str, Any] = {"__metadata__": metadata or {}}
    pos = 0
    for name, t in tensors:
        if t.dtype not in _DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name}: dtype {t.dtype} not supported")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [pos, pos + n]}  # fmt: skip
        pos += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section
    base = 8 + len(blob)
    index: dict[str, dict[str, Any]] = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, t in tensors:
            raw = _raw(t)
            f.write(raw)
            begin, end = header[name]["data_offsets"]
            index[name] = {
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "offsets": [base + begin, base + end],
                "crc32": zlib.crc32(raw),
            }
        f.flush()
        os.fsync(f.fileno())
    return index


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(start of the data section, header) of a safetensors file; CheckpointError if malformed."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 << 20:
                raise CheckpointError(f"{path}: corrupt safetensors header ({n} bytes)")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header: {e}") from None
    return 8 + n, header


def crc32_of_range(path: Path, begin: int, end: int) -> int:
    crc = 0
    with open(path, "rb") as f:
        f.seek(begin)
        left = end - begin
        while left:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                raise CheckpointError(f"{path}: truncated at byte {end - left} of {end}")
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
    return crc


def dim0_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """``[begin, end)`` rows of a dim-0 shard as FSDP2 cuts it (``torch.chunk``: ⌈rows/world⌉
    per rank, the last ranks shorter or empty)."""
    chunk = math.ceil(rows / world) if rows else 0
    return min(rank * chunk, rows), min((rank + 1) * chunk, rows)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
