"""Sharded → sliced: one safetensors file per unit with that unit's full tensors, streamed.

``reslice(src, dst)`` never holds more than one unit in memory (a unit's full tensors are
assembled from every rank's shard byte ranges, read in parallel), writes each unit file with
per-tensor CRC-32, journals finished units so that an interrupted run resumes where it stopped,
and publishes ``dst`` (manifest last, atomic rename) only when every unit is written.

``load_sliced(path, model)`` loads into a model sharded by fsdpkit on *any* number of ranks,
or unsharded: each rank reads only the byte range of its own rows of each tensor, one unit at a
time (row-major tensors make a dim-0 shard one contiguous range).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ._format import CheckpointError, crc32_of_range, dim0_rows, fsync_dir, write_safetensors
from ._optim import restore_optimizer
from .verify import MANIFEST, read_manifest

__all__ = ["SLICED_FORMAT", "load_sliced", "reslice", "unit_of"]

SLICED_FORMAT = "fsdpkit-sliced"
_JOURNAL = "done.jsonl"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
           "uint8": torch.uint8, "bool": torch.bool}  # fmt: skip
_NUMBERED = re.compile(r"^(.*?\.\d+)(\.|$)")


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


def _assemble(src: Path, name: str, meta: dict[str, Any], pool: ThreadPoolExecutor) -> torch.Tensor:
    """A tensor's full value from its shards: each shard's byte range is read once, straight
    into its rows of the output (no intermediate copy), and checksummed from there."""
    out = torch.empty(meta["shape"], dtype=_DTYPES[meta["dtype"]])
    flat = out.view(-1).view(torch.uint8).numpy() if out.numel() else None

    def read(shard: dict[str, Any]) -> None:
        begin, end = shard["offsets"]
        f = src / shard["file"]
        if end == begin:
            return
        start = shard["row_offset"] * ((end - begin) // max(shard["rows"], 1))
        view = memoryview(flat)[start : start + end - begin]
        with open(f, "rb") as fh:
            fh.seek(begin)
            if fh.readinto(view) != end - begin:
                raise CheckpointError(f"{f}: tensor {name}: truncated")
        if zlib.crc32(view) != shard["crc32"]:
            raise CheckpointError(f"{f}: tensor {name}: checksum mismatch (corrupt)")

    list(pool.map(read, meta["shards"]))
    return out


def reslice(
    src: str | Path,
    dst: str | Path,
    *,
    with_optimizer: bool = False,
    workers: int = 4,
    on_unit: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Convert sharded checkpoint ``src`` into sliced checkpoint ``dst``; returns ``dst``.

    Peak memory ≈ the largest unit's full tensors (plus one shard being read per worker);
    disk traffic: every shard byte read once, every slice byte written once.
    ``on_unit(name, index, total)`` reports progress.
    """
    src, dst = Path(src), Path(dst)
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
    with ThreadPoolExecutor(max(1, workers)) as pool, open(journal, "a") as jf:
        for i, (unit, names) in enumerate(units.items()):
            if unit not in done:
                fname = f"unit_{i:05d}.safetensors"
                tensors = [(n, _assemble(src, n, manifest["tensors"][n], pool)) for n in names]
                index = write_safetensors(tmp / fname, tensors)
                entry = {"unit": unit, "file": fname, "bytes": (tmp / fname).stat().st_size,
                         "tensors": index}  # fmt: skip
                jf.write(json.dumps(entry) + "\n")
                jf.flush()
                os.fsync(jf.fileno())
                done[unit] = entry
                del tensors
            if on_unit:
                on_unit(unit, i + 1, len(units))
    sliced = {
        "format": SLICED_FORMAT,
        "version": 1,
        "source_world_size": manifest["world_size"],
        "step": manifest["step"],
        "extra": manifest.get("extra", {}),
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


def _read_sliced_manifest(path: Path) -> dict[str, Any]:
    mf = path / MANIFEST
    try:
        manifest = json.loads(mf.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a complete sliced checkpoint (no {MANIFEST})") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{mf}: unreadable manifest: {e}") from None
    if manifest.get("format") != SLICED_FORMAT:
        raise CheckpointError(f"{mf}: not an fsdpkit sliced checkpoint")
    for name in manifest["files"]:
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise CheckpointError(f"{mf}: file name {name!r} leaves the checkpoint")
    return manifest


def _tensor(data: bytes, dtype: str) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=_DTYPES[dtype])
    return torch.frombuffer(bytearray(data), dtype=_DTYPES[dtype])


def load_sliced(path: str | Path, model: nn.Module, optimizer=None) -> dict[str, Any]:
    """Load a sliced checkpoint into ``model`` (FSDP2-sharded on any world size, or whole).

    Each rank reads only its own rows' byte range of each sharded tensor (and whole
    replicated ones), checks their CRC-32 when it reads a whole tensor, and returns the
    manifest with ``bytes_read`` on this rank.
    """
    path = Path(path)
    manifest = _read_sliced_manifest(path)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    targets: dict[str, torch.Tensor] = {f"param/{n}": p for n, p in model.named_parameters()}
    targets |= {f"buffer/{n}": b for n, b in model.named_buffers()}
    missing = [n for n in targets if n not in manifest["tensors"]]
    if missing:
        raise CheckpointError(f"{path}: no tensor {missing[0]} in the slices (another model?)")
    bytes_read = 0
    loaded: dict[str, torch.Tensor] = {}  # optimizer state, by tensor name
    rows_only: set[str] = set()  # tensors read as this rank's rows of a dim-0 shard
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
        if isinstance(like, DTensor) and meta["shape"] and list(like.shape) == meta["shape"]:
            rows = meta["shape"][0]
            lo, hi = dim0_rows(rows, world, rank)
            row_bytes = (end - begin) // rows if rows else 0
            data = _read_rows(f, begin, row_bytes, (lo, hi))
            local = _tensor(data, meta["dtype"]).view([hi - lo, *meta["shape"][1:]])
            rows_only.add(name)
        else:
            if crc32_of_range(f, begin, end) != meta["crc32"]:
                raise CheckpointError(f"{f}: tensor {name}: checksum mismatch (corrupt)")
            data = _read_rows(f, begin, end - begin, (0, 1)) if end > begin else b""
            local = _tensor(data, meta["dtype"]).view(meta["shape"])
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
