"""Streaming safetensors files with per-tensor CRC-32, and durable writes.

safetensors is an 8-byte little-endian header length, a JSON header (dtype, shape,
``data_offsets`` of every tensor) and the raw bytes. ``safetensors.torch.save_file`` builds
the whole file in memory first (one more copy of a rank's shard); this writer streams tensor by
tensor, checksums on the way out and fsyncs, and any safetensors reader opens the result.
CRC-32 (zlib) detects flipped bytes and truncation; it is not a defence against tampering.
``crc32_combine`` gives the CRC-32 of a concatenation from its parts' CRC-32s without reading
the bytes again (``reslice`` derives each full tensor's checksum from its verified shards').
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from kitcore import FsdpkitError

__all__ = [
    "ST_DTYPES",
    "TORCH_DTYPES",
    "CheckpointError",
    "LocalRows",
    "crc32_combine",
    "crc32_of_range",
    "dim0_rows",
    "fsync_dir",
    "local_rows",
    "read_header",
    "safetensors_header",
    "write_safetensors",
]

_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_CHUNK = 64 << 20  # bytes hashed/read at a time
# safetensors dtype and bytes per element, by the dtype name manifests record ("float32")
ST_DTYPES = {str(k).removeprefix("torch."): (v, k.itemsize) for k, v in _DTYPES.items()}
# the torch dtype of each name manifests record: the same table, the other way
TORCH_DTYPES = {str(k).removeprefix("torch."): k for k in _DTYPES}


class CheckpointError(FsdpkitError):
    """A checkpoint that is incomplete, corrupt or does not fit the model: the message names the
    file and tensor at fault."""


def _raw(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def safetensors_header(
    tensors: Sequence[tuple[str, str, list[int], int]], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[tuple[int, int]]]:
    """The bytes before the data of a safetensors file holding ``tensors`` (name, safetensors
    dtype such as ``F32``, shape, size in bytes) in this order, and each tensor's byte range
    in the file (from the start of the file)."""
    header: dict[str, Any] = {"__metadata__": metadata or {}}
    ranges, pos = [], 0
    for name, dtype, shape, n in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        ranges.append((pos, pos + n))
        pos += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section
    base = 8 + len(blob)
    return struct.pack("<Q", len(blob)) + blob, [(base + b, base + e) for b, e in ranges]


def write_safetensors(
    path: Path, tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """Write ``tensors`` to ``path`` (fsynced); returns per tensor dtype, shape, byte range in
    the file (``offsets``, from the start of the file) and ``crc32``."""
    for name, t in tensors:
        if t.dtype not in _DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name}: dtype {t.dtype} not supported")
    head, ranges = safetensors_header(
        [(n, _DTYPES[t.dtype], list(t.shape), t.numel() * t.element_size()) for n, t in tensors],
        metadata,
    )
    index: dict[str, dict[str, Any]] = {}
    with open(path, "wb") as f:
        f.write(head)
        for (name, t), (begin, end) in zip(tensors, ranges, strict=True):
            raw = _raw(t)
            f.write(raw)
            index[name] = {
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "offsets": [begin, end],
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


# CRC-32 arithmetic: a CRC is a polynomial over GF(2) modulo _POLY, stored bit-reflected (the
# top bit of the int is the coefficient of x^0). Feeding n more bytes multiplies the register
# by x^(8n) mod _POLY before adding theirs, so crc(a + b) = crc(a)·x^(8·len(b)) ⊕ crc(b) (zlib's
# inversion of the register before and after cancels out in this sum).
_POLY = 0xEDB88320  # CRC-32 (zlib, IEEE 802.3), reflected


def _mulmod(a: int, b: int) -> int:
    """a(x)·b(x) mod _POLY, both reflected; 32 shift/xor steps at most."""
    product, bit = 0, 1 << 31
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1  # b·x mod _POLY
    return product


_X2K = [1 << 30]  # x^(2^k) mod _POLY for k = 0, 1, ...: x^1 is bit 30 reflected
for _ in range(63):
    _X2K.append(_mulmod(_X2K[-1], _X2K[-1]))


@lru_cache(maxsize=256)  # a reslice asks for the same few shard and chunk lengths again
def _x_pow_8n(n: int) -> int:
    """x^(8n) mod _POLY: by the binary digits of 8n, O(log n) multiplications."""
    power, k, e = 1 << 31, 0, 8 * n  # x^0
    while e:
        if e & 1:
            power = _mulmod(_X2K[k], power)
        e >>= 1
        k += 1
    return power


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """``zlib.crc32(a + b)`` from ``crc1 = zlib.crc32(a)``, ``crc2 = zlib.crc32(b)`` and
    ``len2 = len(b)`` in bytes, without the bytes."""
    if len2 < 0 or len2 >= 1 << 60:
        raise ValueError(f"crc32_combine: length {len2} out of range")
    return _mulmod(_x_pow_8n(len2), crc1) ^ crc2 if len2 else crc1


def dim0_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """``[begin, end)`` rows of a dim-0 shard as FSDP2 cuts it (``torch.chunk``: ⌈rows/world⌉
    per rank, the last ranks shorter or empty)."""
    chunk = math.ceil(rows / world) if rows else 0
    return min(rank * chunk, rows), min((rank + 1) * chunk, rows)


class LocalRows(NamedTuple):
    """Where a rank's piece of a tensor lies: rows ``[begin, end)`` of dim 0 of the global
    tensor, whether that is a dim-0 shard (else the whole tensor), whether this rank is the one
    that writes it (the copy at coordinate 0 on every ``Replicate`` mesh dimension), and which
    piece it is: ``index`` of ``count`` (0 of 1 when whole)."""

    begin: int
    end: int
    sharded: bool
    writer: bool
    index: int = 0
    count: int = 1


def local_rows(t: torch.Tensor, name: str) -> LocalRows:
    """This rank's rows of ``t`` as its own layout says: a plain tensor is whole (and every
    rank could write it); a DTensor is cut along dim 0 on the one mesh dimension whose placement
    is ``Shard(0)`` (``torch.chunk`` pieces: ``mesh.size(dim)`` of them, this rank's at
    ``mesh.get_local_rank(dim)``) and copied along its ``Replicate`` dimensions: FSDP2 (one
    dimension), HSDP (``(Replicate(), Shard(0))``), a mesh over part of the world. Anything else
    (``Shard`` on another dim, two ``Shard`` dimensions, ``Partial``, strided shards) raises a
    one-line CheckpointError naming the placements."""
    rows = t.shape[0] if t.dim() else 0
    if not isinstance(t, DTensor):
        return LocalRows(0, rows, False, True)
    placements = tuple(t.placements)
    shard_dims = [d for d, p in enumerate(placements) if type(p) is Shard]
    others = [p for p in placements if type(p) not in (Shard, Replicate)]
    if others or len(shard_dims) > 1 or any(placements[d].dim != 0 for d in shard_dims):
        raise CheckpointError(
            f"tensor {name}: placements {placements} not supported (ckpt saves dim-0 shards: "
            "Shard(0) on at most one mesh dimension, Replicate on the others)"
        )
    coord = t.device_mesh.get_coordinate()
    if coord is None:  # this rank is not in the tensor's mesh: it holds nothing of it
        return LocalRows(0, 0, bool(shard_dims), False)
    writer = all(coord[d] == 0 for d, p in enumerate(placements) if type(p) is Replicate)
    if not shard_dims:
        return LocalRows(0, rows, False, writer)
    d = shard_dims[0]
    count = t.device_mesh.size(d)
    begin, end = dim0_rows(rows, count, coord[d])
    return LocalRows(begin, end, True, writer, coord[d], count)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
