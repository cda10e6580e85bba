"""The two pickled things in a PyTorch DCP checkpoint, read without running anything.

``.metadata`` is a pickle of ``torch.distributed.checkpoint.metadata.Metadata``; every item in a
``__R_F.distcp`` file is a ``torch.save`` zip (stored, not compressed) whose ``data.pkl``
describes a tensor (``torch._utils._rebuild_tensor_v2``) or a small Python value (optimizer
hyper-parameters). ``pickle.load`` on either would run whatever callable the file names
(pytorch#189308). Here each is read by an ``Unpickler`` whose ``find_class`` allows only the
DCP metadata classes and the few torch objects their fields hold; a tensor record is rebuilt
as plain numbers (storage dtype, key, offset, size, stride), never as a tensor.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import struct
import zlib
from collections import OrderedDict
from pathlib import Path, PosixPath, PurePosixPath, PureWindowsPath, WindowsPath
from typing import Any

import torch

from ._format import ST_DTYPES, CheckpointError


@functools.cache
def _meta_classes() -> dict[tuple[str, str], Any]:
    """The classes DCP metadata may name. Imported on first use: torch.distributed.checkpoint
    loads FSDP, which ``import ckpt`` must not."""
    from torch.distributed.checkpoint import filesystem as _fs
    from torch.distributed.checkpoint import metadata as _md

    return {
        ("torch.distributed.checkpoint.metadata", n): getattr(_md, n)
        for n in ("Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
                  "BytesStorageMetadata", "TensorProperties", "StorageMeta",
                  "_MEM_FORMAT_ENCODING")
    } | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _fs._StorageInfo,
        ("torch", "Size"): torch.Size,
        # a dict lookup of torch's layouts by name (how torch.layout pickles)
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("collections", "OrderedDict"): OrderedDict,
    } | {
        # StorageMeta.checkpoint_id: the path the checkpoint was saved to
        ("pathlib", c.__name__): c
        for c in (Path, PosixPath, WindowsPath, PurePosixPath, PureWindowsPath)
    }  # fmt: skip


def is_tensor_meta(meta: Any) -> bool:
    """Whether a DCP ``state_dict_metadata`` entry describes a tensor."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return isinstance(meta, TensorStorageMetadata)


# torch.save of a tensor names its storage by the legacy typed class: dtype by that name
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}  # fmt: skip


class _Restricted(pickle.Unpickler):
    """Resolves only the globals in ``allowed``; anything else is a one-line CheckpointError
    naming ``where`` (nothing named by the file is imported or called)."""

    def __init__(self, data: bytes, where: str, allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(io.BytesIO(data))
        self.where, self.allowed = where, allowed

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None and module == "torch" and isinstance(getattr(torch, name, None),
                                                              torch.dtype):  # fmt: skip
            found = getattr(torch, name)
        if found is None:
            raise CheckpointError(f"{self.where}: refuses to unpickle {module}.{name} (not part "
                                  "of DCP's metadata; a tampered or foreign file?)")  # fmt: skip
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.where}: unexpected persistent id {pid!r}")


def _restricted_load(data: bytes, where: str, allowed: dict, cls=_Restricted) -> Any:
    try:
        return cls(data, where, allowed).load()
    except CheckpointError:
        raise
    except Exception as e:  # malformed pickles raise anything from ValueError to IndexError
        raise CheckpointError(f"{where}: corrupt pickle ({type(e).__name__}: {e})") from None


def load_metadata(path: Path) -> Any:
    """``.metadata`` through the allow-list; CheckpointError if missing, refused or malformed."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a DCP checkpoint?)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable: {e}") from None
    from torch.distributed.checkpoint.metadata import Metadata

    md = _restricted_load(data, str(path), _meta_classes())
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):  # fmt: skip
        raise CheckpointError(f"{path}: not DCP metadata (filesystem storage)")
    return md


def _rebuild_record(storage, storage_offset, size, stride, *_):
    return storage, storage_offset, tuple(size), tuple(stride)


class _TensorRecord(_Restricted):
    """data.pkl of ``torch.save(tensor)``: ((dtype, key, numel), offset, size, stride)."""

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and pid[1] in _STORAGE_DTYPES.values() and isinstance(pid[2], str)):  # fmt: skip
            raise CheckpointError(f"{self.where}: unexpected storage record {pid!r}")
        return pid[1], pid[2], pid[4]


_TENSOR_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_record,
    ("collections", "OrderedDict"): OrderedDict,
} | {("torch", k): v for k, v in _STORAGE_DTYPES.items()}
_VALUE_GLOBALS = {("collections", "OrderedDict"): OrderedDict}


_EOCD = struct.Struct("<4s4H2LH")  # end of central directory (no comment: torch writes none)
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # zip64 end of central directory
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory header
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header
_PEEK = 4096  # bytes read at each end of a record: its small entries and its directory


class _BadZip(Exception):
    pass


class _StoredZip:
    """Entries of the zip at bytes ``[begin, begin + length)`` of ``fd`` (torch.save's: stored,
    offsets relative to its start), from one read at each end: zipfile spends ~1 ms and a
    dozen reads per record, the bulk of reading a DCP checkpoint's thousands of them."""

    def __init__(self, fd: int, begin: int, length: int) -> None:
        self.fd, self.begin, self.length = fd, begin, length
        self.head = os.pread(fd, min(length, _PEEK), begin)
        tail_at = max(0, length - _PEEK)
        self.tail, self.tail_at = os.pread(fd, length - tail_at, begin + tail_at), tail_at
        sig, _, _, _, count, size, at, _ = _EOCD.unpack(self._bytes(length - 22, 22))
        if sig != b"PK\x05\x06":
            raise _BadZip("no end of central directory")
        if 0xFFFFFFFF in (size, at) or count == 0xFFFF:
            (at64,) = struct.unpack_from("<Q", self._bytes(length - 42, 20), 8)  # zip64 locator
            sig, *_, count, size, at = _EOCD64.unpack(self._bytes(at64, 56))
            if sig != b"PK\x06\x06":
                raise _BadZip("no zip64 end of central directory")
        directory, pos, self.entries = self._bytes(at, size), 0, {}
        for _ in range(count):
            (sig, _, _, _, method, _, _, crc, csize, usize, name_len, extra_len, comment_len, _,
             _, _, offset) = _CENTRAL.unpack_from(directory, pos)  # fmt: skip
            if sig != b"PK\x01\x02":
                raise _BadZip(f"bad central directory entry at byte {at + pos}")
            name = directory[pos + 46 : pos + 46 + name_len].decode()
            extra = directory[pos + 46 + name_len : pos + 46 + name_len + extra_len]
            usize, csize, offset = _zip64(extra, usize, csize, offset)
            self.entries[name.partition("/")[2]] = (offset, usize, crc, method or csize != usize)
            pos += 46 + name_len + extra_len + comment_len

    def _bytes(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > self.length:
            raise _BadZip(f"bytes [{offset}, {offset + n}) outside the record")
        if offset + n <= len(self.head):
            return self.head[offset : offset + n]
        if offset >= self.tail_at:
            return self.tail[offset - self.tail_at : offset - self.tail_at + n]
        data = os.pread(self.fd, n, self.begin + offset)
        if len(data) != n:
            raise _BadZip("truncated")
        return data

    def locate(self, name: str) -> tuple[int, int, int]:
        """(start of the data from the record's start, size in bytes, CRC-32) of a stored entry."""
        offset, size, crc, compressed = self.entries[name]
        sig, *_, name_len, extra_len = _LOCAL.unpack(self._bytes(offset, 30))
        if sig != b"PK\x03\x04" or compressed:
            raise _BadZip(f"entry {name}: bad local header or compressed")
        return offset + 30 + name_len + extra_len, size, crc

    def read(self, name: str) -> bytes:
        start, size, crc = self.locate(name)
        data = self._bytes(start, size)
        if zlib.crc32(data) != crc:
            raise _BadZip(f"entry {name}: CRC-32 mismatch")
        return data


def _zip64(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    """Sizes and offset from a zip64 extra field (tag 1) where the 32-bit ones are saturated."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            values, k = [usize, csize, offset], pos + 4
            for i in range(3):
                if values[i] == 0xFFFFFFFF:
                    values[i] = struct.unpack_from("<Q", extra, k)[0]
                    k += 8
            return values[0], values[1], values[2]
        pos += 4 + n
    return usize, csize, offset


def _contiguous(shape: tuple, stride: tuple, numel: int) -> bool:
    """Row-major with no gaps and nothing outside: the storage is exactly the tensor's bytes."""
    if len(stride) != len(shape):
        return False
    step = 1
    for n, s in zip(reversed(shape), reversed(stride), strict=True):
        if n != 1 and s != step:  # a size-1 dim's stride does not matter
            return False
        step *= n
    return step == numel


def read_item(fd: int, begin: int, length: int, where: str, kind: str):
    """One ``torch.save`` record at bytes ``[begin, begin + length)`` of an open ``.distcp``.

    ``kind="tensor"``: returns (dtype name, shape, data ``[start, end)`` in the file, CRC-32 of
    the data from the zip directory), after checking the record is one contiguous
    little-endian tensor whose storage is exactly its bytes (DCP clones views before saving).
    ``"value"``: the value, unpickled with no globals but OrderedDict. ``"check"``: None.
    ``data.pkl``'s own CRC-32 is checked in every case."""
    try:
        z = _StoredZip(fd, begin, length)
        pkl = z.read("data.pkl")
        order = z.read("byteorder") if "byteorder" in z.entries else b"little"
    except (_BadZip, KeyError, OSError, ValueError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointError(f"{where}: corrupt torch.save record at byte {begin} "
                              f"({type(e).__name__}: {e})") from None  # fmt: skip
    if kind != "tensor":
        return _restricted_load(pkl, where, _VALUE_GLOBALS) if kind == "value" else None
    record = _restricted_load(pkl, where, _TENSOR_GLOBALS, _TensorRecord)
    try:
        (dtype, key, numel), offset, shape, stride = record
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: record at byte {begin} is not a tensor") from None
    try:
        start, size, crc = z.locate(f"data/{key}")
    except (_BadZip, KeyError, struct.error) as e:
        raise CheckpointError(f"{where}: corrupt tensor entry at byte {begin} ({e})") from None
    if order != b"little" or offset != 0 or size != numel * ST_DTYPES[dtype][1] \
            or not _contiguous(shape, stride, numel):  # fmt: skip
        raise CheckpointError(f"{where}: record at byte {begin} is not one contiguous "
                              "little-endian uncompressed tensor (not supported)")  # fmt: skip
    if start + size > length:
        raise CheckpointError(f"{where}: tensor data overruns its record at byte {begin}")
    return dtype, list(shape), (begin + start, begin + start + size), crc
