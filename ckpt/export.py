"""fsdpkit checkpoint → Hugging Face safetensors: plain state-dict names, streamed.

``export_hf(src, dst)`` reads a sliced checkpoint (``ckpt reslice``) or a sharded one and writes
what ``transformers``, ``accelerate`` and ``huggingface_hub`` load: the model's own state-dict
names (no ``param/`` / ``buffer/`` prefix), ``{"format": "pt"}`` in every file's metadata, and
either ``model.safetensors.index.json`` with numbered files (``format="hf"``) or one
``model.safetensors`` (``format="single"``). Optimizer state is left out. Every byte is
copied chunk by chunk (converted to ``dtype`` on the way when asked), and every source range's
CRC-32 is checked as it is read, so memory stays a few chunks whatever the model. The export
is built in a hidden sibling directory and renamed into place at the end: ``dst`` either does
not exist or is complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._format import ST_DTYPES, CheckpointError, fsync_dir, safetensors_header
from .sliced import _tensor_plan
from .verify import _either

__all__ = ["EXPORT_DTYPES", "EXPORT_FORMATS", "HF_INDEX", "HF_SINGLE", "export_hf"]

EXPORT_FORMATS = ("hf", "single")
EXPORT_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
_FLOATS = {"float64", "float32", "float16", "bfloat16"}
_TORCH = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}  # fmt: skip
_CHUNK = 4 << 20  # bytes read (and converted) at a time; a multiple of every itemsize


@dataclass(frozen=True, slots=True)
class _Out:
    """One exported tensor: its plain name, source and output dtype names, shape, output size
    in bytes, and source byte ranges ``(file, begin, end, crc32)`` in row order."""

    name: str
    src_dtype: str
    dtype: str
    shape: list[int]
    nbytes: int
    segments: list[tuple[Path, int, int, int]]


def _plan(src: Path, dtype: str | None) -> tuple[str, list[_Out], dict[str, int]]:
    """(source kind, tensors to export in manifest order, tensors left out by kind: optimizer
    state, RNG states)."""
    kind, manifest = _either(src)
    out, skipped = [], {}
    for name, meta in manifest["tensors"].items():
        if meta["kind"] not in ("param", "buffer"):
            skipped[meta["kind"]] = skipped.get(meta["kind"], 0) + 1
            continue
        if kind == "sliced":  # one whole-tensor range: the sharded layout's single row block
            meta = {**meta, "shards": [{**meta["shards"][0], "row_offset": 0}]}
        _, src_dtype, _, shape, _, segments = _tensor_plan(src, name, meta)
        to = dtype if dtype and src_dtype in _FLOATS else src_dtype
        size = math.prod(shape) * ST_DTYPES[to][1]
        out.append(_Out(name.split("/", 1)[1], src_dtype, to, shape, size, segments))
    if not out:
        raise CheckpointError(f"{src}: no model tensors to export")
    return kind, out, skipped


def _shards(tensors: list[_Out], max_shard_bytes: int) -> list[list[_Out]]:
    """Consecutive groups of at most ``max_shard_bytes`` (a larger tensor goes alone)."""
    groups: list[list[_Out]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return groups


def _copy(t: _Out, out, files: ExitStack, opened: dict, buf: memoryview) -> None:
    """Stream ``t``'s source ranges into ``out``, converting float dtypes chunk by chunk; each
    range's CRC-32 is checked once read."""
    convert = t.dtype != t.src_dtype
    for path, begin, end, crc in t.segments:
        f = opened.get(path)
        if f is None:
            f = opened[path] = files.enter_context(open(path, "rb", buffering=0))  # noqa: SIM115
        f.seek(begin)
        running, left = 0, end - begin
        while left:
            view = buf[: min(left, _CHUNK)]
            n = f.readinto(view)
            if not n:
                raise CheckpointError(f"{path}: tensor {t.name}: truncated")
            view = view[:n]
            running = zlib.crc32(view, running)
            if convert:
                chunk = torch.frombuffer(view, dtype=_TORCH[t.src_dtype]).to(_TORCH[t.dtype])
                out.write(memoryview(chunk.view(torch.uint8).numpy()))
            else:
                out.write(view)
            left -= n
        if running != crc:
            raise CheckpointError(f"{path}: tensor {t.name}: checksum mismatch (corrupt)")


def _write_file(path: Path, tensors: list[_Out], files: ExitStack, opened: dict) -> int:
    """Write one safetensors file (fsynced); its size in bytes."""
    head, ranges = safetensors_header(
        [(t.name, ST_DTYPES[t.dtype][0], t.shape, t.nbytes) for t in tensors], {"format": "pt"}
    )
    buf = memoryview(bytearray(_CHUNK))
    with open(path, "wb") as out:
        out.write(head)
        for t, (_, end) in zip(tensors, ranges, strict=True):
            _copy(t, out, files, opened, buf)
            if out.tell() != end:  # a source range longer or shorter than its tensor
                raise CheckpointError(f"{t.segments[0][0]}: tensor {t.name}: wrong size")
        out.flush()
        os.fsync(out.fileno())
        return out.tell()


@contextmanager
def _staged(dst: Path) -> Iterator[Path]:
    """A hidden sibling directory to build ``dst`` in, renamed to ``dst`` (fsynced) when the
    block ends and removed if it raises: ``dst`` never exists half-written."""
    if dst.exists():
        raise CheckpointError(f"{dst}: exists; outputs are never overwritten")
    tmp = dst.parent / f".{dst.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted run to the same name
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_dir(tmp)
        if dst.exists():  # created by someone else meanwhile
            raise CheckpointError(f"{dst}: exists; outputs are never overwritten")
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(dst.parent)


def _write_json(path: Path, obj: Any, indent: int = 1) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())


def export_hf(
    src: str | Path,
    dst: str | Path,
    *,
    format: str = "hf",
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
) -> dict[str, Any]:
    """Export sliced or sharded checkpoint ``src`` as a Hugging Face model directory ``dst``.

    ``format``: ``"hf"`` writes ``model-0000i-of-0000n.safetensors`` files of at most
    ``max_shard_bytes`` bytes each (Hugging Face's default 5 GB; a larger tensor goes alone)
    and ``model.safetensors.index.json`` (``weight_map``, ``metadata.total_size`` in bytes);
    ``"single"`` writes one ``model.safetensors``. ``dtype`` (``"bf16"`` / ``"fp16"``) converts
    floating-point tensors (integer buffers such as BatchNorm's ``num_batches_tracked`` stay).

    Streams: memory is one 4 MiB chunk (and its converted copy) beyond the interpreter; every
    source byte is read once and CRC-checked. Returns a summary: ``files`` (name → tensors,
    bytes), ``tensors``, ``total_size`` (tensor bytes), ``left_out`` (tensors not exported,
    by kind: ``optim``, ``rng``).
    Raises CheckpointError if ``dst`` exists, ``src`` is incomplete or corrupt (naming the file
    and tensor), or an option is unknown; nothing is left at ``dst`` then.
    """
    src, dst = Path(src), Path(dst)
    if format not in EXPORT_FORMATS:
        raise CheckpointError(f"unknown export format {format!r}; choose one of hf, single")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose bf16 or fp16 (or none to keep)")
    if max_shard_bytes < 1:
        raise CheckpointError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    if dst.exists():
        raise CheckpointError(f"{dst}: exists; outputs are never overwritten")
    kind, tensors, skipped = _plan(src, EXPORT_DTYPES.get(dtype) if dtype else None)
    if format == "single":
        groups, names = [tensors], [HF_SINGLE]
    else:
        groups = _shards(tensors, max_shard_bytes)
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    files: dict[str, dict[str, int]] = {}
    total = sum(t.nbytes for t in tensors)
    with _staged(dst) as tmp, ExitStack() as stack:
        opened: dict[Path, Any] = {}
        for fname, group in zip(names, groups, strict=True):
            size = _write_file(tmp / fname, group, stack, opened)
            files[fname] = {"tensors": len(group), "bytes": size}
        if format == "hf":
            weight_map = {t.name: f for f, g in zip(names, groups, strict=True) for t in g}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            _write_json(tmp / HF_INDEX, index, indent=2)
    return {
        "dst": str(dst),
        "source": kind,
        "format": format,
        "dtype": dtype or "as saved",
        "files": files,
        "tensors": len(tensors),
        "total_size": total,
        "left_out": skipped,
    }
