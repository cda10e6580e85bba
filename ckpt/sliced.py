"""Sharded → sliced: one safetensors file per unit with that unit's full tensors, streamed.

``reslice(src, dst)`` streams: each unit file is written chunk by chunk straight from every
rank's shard byte ranges (read and checked against their CRC-32 in parallel), so memory stays a
few chunks whatever the model; each output tensor's CRC-32 is combined from its shards'. It
journals finished (fsynced) units so that an interrupted run resumes where it stopped, and
publishes ``dst`` (manifest last, atomic rename) only when every unit is written.

``load_sliced(path, model)`` loads into a model sharded by fsdpkit on *any* number of ranks,
or unsharded: each rank reads only the byte range of its own rows of each tensor, one unit at a
time (row-major tensors make a dim-0 shard one contiguous range).
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ._format import (
    ST_DTYPES,
    TORCH_DTYPES,
    CheckpointError,
    crc32_combine,
    crc32_of_range,
    fsync_dir,
    local_rows,
    safetensors_header,
)
from ._optim import restore_optimizer
from .dcp import is_dcp, read_dcp_manifest
from .verify import MANIFEST, SLICED_FORMAT, read_manifest, read_sliced_manifest

__all__ = ["SLICED_FORMAT", "load_sliced", "reslice", "unit_of"]

_JOURNAL = "done.jsonl"
_NUMBERED = re.compile(r"^(.*?\.\d+)(\.|$)")
# Bytes a thread reads, checksums and writes at a time: small enough to stay in a core's L2
# cache (≥ 512 KiB on current server CPUs) between the three (2 to 8 MiB chunks made reslice
# about twice as slow on an EPYC with 1 MiB of L2), large enough that the per-chunk Python
# work (~30 µs) stays a few % of the time.
_CHUNK = 512 << 10


def unit_of(tensor_name: str, units: list[str] | None = None) -> str:
    """The unit a tensor belongs to: the longest of ``units`` (recorded by ``save_sharded``)
    that prefixes its module path, else the top-level module. Without ``units``, the first
    numbered module: ``param/trunk.units.3.a.weight`` → ``trunk.units.3``; else the top-level
    module (``param/prototypes.weight`` → ``prototypes``)."""
    _, _, rest = tensor_name.partition("/")
    if tensor_name.startswith("optim/"):
        rest = rest.rsplit("/", 1)[0]  # optim/<param>/<state key>
    top = rest.split(".", 1)[0]
    if units is not None:
        hits = [u for u in units if rest == u or rest.startswith(u + ".")]
        return max(hits, key=len) if hits else top
    m = _NUMBERED.match(rest)
    return m.group(1) if m and m.group(1).startswith(top + ".") and top != rest else top


def _read_rows(path: Path, begin: int, row_bytes: int, rows: tuple[int, int]) -> bytes:
    with open(path, "rb") as f:
        f.seek(begin + rows[0] * row_bytes)
        data = f.read((rows[1] - rows[0]) * row_bytes)
    if len(data) != (rows[1] - rows[0]) * row_bytes:
        raise CheckpointError(f"{path}: truncated")
    return data


def _tensor_plan(src: Path, name: str, meta: dict[str, Any]) -> tuple:
    """(name, dtype, safetensors dtype, shape, size in bytes, shard byte ranges ``(file, begin,
    end, crc32)`` in row order) of a full tensor. Shards hold exactly their own rows (FSDP2's local
    tensors carry no padding), so the tensor is their bytes concatenated; checked here, because
    the output's CRC-32 is derived from the shards' on that premise."""
    if meta["dtype"] not in ST_DTYPES:
        raise CheckpointError(f"{src / MANIFEST}: tensor {name}: dtype {meta['dtype']} unknown")
    dtype, itemsize = ST_DTYPES[meta["dtype"]]
    shape = meta["shape"]
    nbytes = math.prod(shape) * itemsize
    row_bytes = nbytes // shape[0] if shape and shape[0] else 0
    segments, pos = [], 0
    for shard in sorted(meta["shards"], key=lambda sh: sh["row_offset"]):
        begin, end = shard["offsets"]
        if shard["row_offset"] * row_bytes != pos or end < begin:
            break
        segments.append((src / shard["file"], begin, end, shard["crc32"]))
        pos += end - begin
    if pos != nbytes or len(segments) != len(meta["shards"]):
        raise CheckpointError(f"{src / MANIFEST}: tensor {name}: its shards do not tile its rows")
    return name, meta["dtype"], dtype, shape, nbytes, segments


_local = threading.local()


def _copy_chunk(src: int, offset: int, n: int, out: int, to: int, where: tuple) -> int:
    """Copy bytes ``[offset, offset + n)`` of file ``src`` to ``to`` in file ``out`` through
    this thread's buffer; their CRC-32. One thread reads, checksums and writes a chunk while it
    is in its core's cache; ``zlib.crc32`` and the system calls release the GIL."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        buf = _local.buf = memoryview(bytearray(max(n, _CHUNK)))
    view, got = buf[:n], 0
    while got < n:
        k = os.preadv(src, [view[got:]], offset + got)
        if k == 0:
            raise CheckpointError("{}: tensor {}: truncated".format(*where))
        got += k
    crc = zlib.crc32(view)
    done = 0
    while done < n:
        done += os.pwrite(out, view[done:], to + done)
    return crc


def _write_unit(path: Path, plan: list, fds: dict, pool: ThreadPoolExecutor):
    """Write one unit file (not fsynced; the caller does) from ``plan`` (``_tensor_plan`` of
    each tensor): ``pool`` copies chunks of at most ``_CHUNK`` bytes to their place in the
    file, checksumming each on the way. Every shard's CRC-32 is checked once its chunks are in;
    each output tensor's CRC-32 is combined from its shards' (no second pass over the bytes).
    Returns (open file, per-tensor dtype, shape, ``offsets`` and ``crc32`` as
    ``write_safetensors`` gives them)."""
    head, ranges = safetensors_header([(n, st, shape, nb) for n, _, st, shape, nb, _ in plan])
    index, steps = {}, []
    for (name, dtype, _, shape, _, segments), (begin, end) in zip(plan, ranges, strict=True):
        crc, to = 0, begin
        for seg, (f, b, e, shard_crc) in enumerate(segments):
            crc = crc32_combine(crc, shard_crc, e - b)
            if e == b and shard_crc != 0:  # an empty shard's CRC-32 is 0
                raise CheckpointError(f"{f}: tensor {name}: checksum mismatch (corrupt)")
            steps += [(name, seg, f, off, min(_CHUNK, e - off), to + off - b,
                       off + _CHUNK >= e, shard_crc) for off in range(b, e, _CHUNK)]  # fmt: skip
            to += e - b
        index[name] = {"dtype": dtype, "shape": shape, "offsets": [begin, end], "crc32": crc}
    for f in {step[2] for step in steps} - fds.keys():
        fds[f] = os.open(f, os.O_RDONLY)
    out = open(path, "wb", buffering=0)  # noqa: SIM115 (closed by the journaling thread)
    futures = []
    try:
        _write_all(out, head)
        futures = [pool.submit(_copy_chunk, fds[f], off, n, out.fileno(), to, (f, name))
                   for name, _, f, off, n, to, _, _ in steps]  # fmt: skip
        running, current = 0, None
        for (name, seg, f, _, n, _, last, shard_crc), fut in zip(steps, futures, strict=True):
            if (name, seg) != current:
                running, current = 0, (name, seg)
            running = crc32_combine(running, fut.result(), n)
            if last and running != shard_crc:
                raise CheckpointError(f"{f}: tensor {name}: checksum mismatch (corrupt)")
    except BaseException:
        for fut in futures:
            fut.cancel()
        wait(futures)  # no chunk may still write to the file once it is closed
        out.close()
        raise
    return out, index


def _write_all(out, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[out.write(view) :]


def _make_durable(out, unit: str, fname: str, index: dict, jf) -> dict[str, Any]:
    """fsync a written unit file, then journal it (fsynced): from here a rerun keeps it."""
    os.fsync(out.fileno())
    out.close()
    entry = {"unit": unit, "file": fname, "bytes": os.stat(out.name).st_size, "tensors": index}
    jf.write(json.dumps(entry) + "\n")
    jf.flush()
    os.fsync(jf.fileno())
    return entry


def reslice(
    src: str | Path,
    dst: str | Path,
    *,
    with_optimizer: bool = False,
    workers: int = 4,
    on_unit: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Convert sharded checkpoint ``src`` (ours, or a PyTorch DCP directory: see ``ckpt.dcp``)
    into sliced checkpoint ``dst``; returns ``dst``.

    Streams: each of ``workers`` threads copies chunks of ``_CHUNK`` bytes (512 KiB) from the
    shards to their place in a unit file, checksumming each on the way, so peak memory is
    ``workers`` chunks beyond the interpreter, whatever the model. Disk traffic: every shard
    byte read once, every slice byte written once; the output CRC-32s are derived from the
    shards'. A unit file is fsynced and journaled by another thread while the next one is
    written. ``on_unit(name, index, total)`` reports progress: called once a unit is written
    (it is journaled before ``reslice`` returns or raises).
    """
    src, dst = Path(src), Path(dst)
    if is_dcp(src):
        manifest = read_dcp_manifest(src, need_optimizer=with_optimizer)
    else:
        manifest = read_manifest(src)
    if dst.exists():
        raise CheckpointError(f"{dst}: exists; checkpoints are never overwritten")
    kinds = {"param", "buffer"} | ({"optim"} if with_optimizer else set())
    units: dict[str, list[str]] = {}
    for name, meta in manifest["tensors"].items():
        if meta["kind"] in kinds:
            units.setdefault(unit_of(name, manifest.get("units")), []).append(name)
    tmp = dst.parent / f".{dst.name}.partial"
    tmp.mkdir(parents=True, exist_ok=True)
    journal = tmp / _JOURNAL
    # a run killed between writing the manifest and publishing left one: it must not make this
    # directory look complete while its units are rewritten
    (tmp / MANIFEST).unlink(missing_ok=True)
    done = {}
    if journal.exists():  # an interrupted run: keep the units it finished
        for line in journal.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # the line being written when it was killed
            f = tmp / entry["file"]
            if f.is_file() and f.stat().st_size == entry["bytes"]:
                done[entry["unit"]] = entry
    workers = max(1, workers)
    fds: dict[Path, int] = {}
    finishing: list[Future] = []
    # exits in reverse: the readers finish, the journaling thread drains, the journal closes,
    # then the shard files (a read may still be in flight when a unit fails)
    try:
        with (
            open(journal, "a") as jf,
            ThreadPoolExecutor(1) as durable,
            ThreadPoolExecutor(workers) as pool,
        ):
            for i, (unit, names) in enumerate(units.items()):
                if unit not in done:
                    fname = f"unit_{i:05d}.safetensors"
                    plan = [_tensor_plan(src, n, manifest["tensors"][n]) for n in names]
                    out, index = _write_unit(tmp / fname, plan, fds, pool)
                    finishing.append(durable.submit(_make_durable, out, unit, fname, index, jf))
                    for fut in finishing:  # an fsync error stops the run early
                        if fut.done():
                            fut.result()
                if on_unit:
                    on_unit(unit, i + 1, len(units))
    finally:
        for fd in fds.values():
            os.close(fd)
    for fut in finishing:
        entry = fut.result()
        done[entry["unit"]] = entry
    sliced = {
        "format": SLICED_FORMAT,
        "version": 1,
        "source_world_size": manifest["world_size"],
        "step": manifest["step"],
        "extra": manifest.get("extra", {}),
        **({"model": manifest["model"]} if "model" in manifest else {}),
        "optimizer": manifest["optimizer"] if with_optimizer else {},
        "units": list(units),
        "files": {done[u]["file"]: {"unit": u, "bytes": done[u]["bytes"]} for u in units},
        "tensors": {
            n: {
                "unit": u,
                "file": done[u]["file"],
                **done[u]["tensors"][n],
                "kind": manifest["tensors"][n]["kind"],
            }
            for u, ns in units.items()
            for n in ns
        },
    }
    with open(tmp / MANIFEST, "w") as f:
        json.dump(sliced, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    journal.unlink()
    fsync_dir(tmp)
    os.rename(tmp, dst)
    fsync_dir(dst.parent)
    return dst


def _tensor(data: bytes, dtype: str) -> torch.Tensor:
    if dtype not in TORCH_DTYPES:  # the manifest was checked; a slice file may still lie
        raise CheckpointError(f"slice dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
    if not data:
        return torch.empty(0, dtype=TORCH_DTYPES[dtype])
    return torch.frombuffer(bytearray(data), dtype=TORCH_DTYPES[dtype])


def load_sliced(path: str | Path, model: nn.Module, optimizer=None) -> dict[str, Any]:
    """Load a sliced checkpoint into ``model`` (FSDP2-sharded on any world size, or whole).

    Each rank reads only its own rows' byte range of each sharded tensor (and whole
    replicated ones), checks their CRC-32 when it reads a whole tensor, and returns the
    manifest with ``bytes_read`` on this rank. Its rows come from the model's own layout
    (``_format.local_rows``): the ``Shard(0)`` mesh dimension of each DTensor, whatever its
    mesh (FSDP2 over the world or part of it, HSDP's replicate × shard).
    """
    path = Path(path)
    manifest = read_sliced_manifest(path)
    targets: dict[str, torch.Tensor] = {f"param/{n}": p for n, p in model.named_parameters()}
    targets |= {f"buffer/{n}": b for n, b in model.named_buffers()}
    missing = [n for n in targets if n not in manifest["tensors"]]
    if missing:
        raise CheckpointError(f"{path}: no tensor {missing[0]} in the slices (another model?)")
    bytes_read = 0
    loaded: dict[str, torch.Tensor] = {}  # optimizer state, by tensor name
    rows_only: set[str] = set()  # tensors read as this rank's piece of a DTensor
    for name, meta in manifest["tensors"].items():  # unit files in order: one unit at a time
        if meta["kind"] == "optim" and optimizer is None:
            continue  # no optimizer to restore: do not read its state
        f = path / meta["file"]
        dst = targets.get(name)
        if dst is not None and list(dst.shape) != meta["shape"]:
            raise CheckpointError(f"{f}: tensor {name}: shape {meta['shape']} in the slices, "
                                  f"{list(dst.shape)} in the model (another model?)")  # fmt: skip
        like = dst if dst is not None else dict(model.named_parameters()).get(
            name.removeprefix("optim/").rsplit("/", 1)[0])  # fmt: skip
        begin, end = meta["offsets"]
        # laid out like a DTensor of the model: this rank reads its rows, by that layout
        as_local = isinstance(like, DTensor) and bool(meta["shape"]) and (
            list(like.shape) == meta["shape"])  # fmt: skip
        rows = local_rows(like, name) if as_local else None
        n = meta["shape"][0] if meta["shape"] else 0
        if rows is not None and (rows.begin, rows.end) != (0, n):  # part of it
            row_bytes = (end - begin) // n if n else 0
            data = _read_rows(f, begin, row_bytes, (rows.begin, rows.end))
            local = _tensor(data, meta["dtype"]).view([rows.end - rows.begin, *meta["shape"][1:]])
        else:
            if crc32_of_range(f, begin, end) != meta["crc32"]:
                raise CheckpointError(f"{f}: tensor {name}: checksum mismatch (corrupt)")
            data = _read_rows(f, begin, end - begin, (0, 1)) if end > begin else b""
            local = _tensor(data, meta["dtype"]).view(meta["shape"])
        if as_local:
            rows_only.add(name)
        bytes_read += len(data)
        if dst is not None:
            with torch.no_grad():
                (dst.to_local() if isinstance(dst, DTensor) else dst).copy_(local)
        else:
            loaded[name] = local
    if optimizer is not None:
        if not manifest.get("optimizer"):
            raise CheckpointError(f"{path}: no optimizer state (reslice with --with-optimizer)")
        tensors = {name: (t, name in rows_only) for name, t in loaded.items()}
        restore_optimizer(manifest, model, optimizer, tensors)
    return manifest | {"bytes_read": bytes_read}
