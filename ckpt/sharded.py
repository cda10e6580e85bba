"""Crash-safe sharded checkpoints for training: every rank writes its own shard.

``save_sharded(path, model, optimizer, step=...)`` on every rank writes, under a temporary
directory next to ``path``:

- ``rank_NNNNN.safetensors``: that rank's local shards of parameters and optimizer state, the
  whole of replicated tensors (buffers, replicated parameters) on rank 0 only, and the rank's
  RNG state; fsynced;
- ``manifest.json`` last, by rank 0: format version, world size, step, user ``extra``, the
  optimizer's non-tensor state, and per tensor its global shape, dtype, and every shard's file,
  offset along dim 0, byte range and CRC-32; fsynced with the directory.

Then rank 0 publishes by an atomic ``rename`` to ``path``. A checkpoint is complete exactly
when its manifest exists; an interrupted save leaves only a ``.partial`` directory, which
loaders ignore and the next save of that name clears. ``path`` is never overwritten.
``keep_last=N`` then removes older complete checkpoints beside it, each renamed out of sight
before it is deleted (so a crash mid-delete cannot leave a complete-looking partial one).

``blocking=False`` stages the rank's state (host copies) and returns; a background thread
writes and publishes by the same rules (``ckpt._async``), one save in flight per process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from ._async import AsyncSave, side_group, wait_for_saves
from ._format import CheckpointError, dim0_rows, fsync_dir, write_safetensors
from ._optim import restore_optimizer
from .verify import FORMAT, MANIFEST, VERSION, read_manifest, verify

__all__ = [
    "AsyncSave",
    "latest_checkpoint",
    "list_checkpoints",
    "load_sharded",
    "save_sharded",
    "wait_for_saves",
]


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(group=None) -> None:
    if _dist()[1] > 1:
        dist.barrier(group=group)


def _shard_info(t: torch.Tensor, rank: int) -> tuple[torch.Tensor, list[int], bool]:
    """(local tensor, global shape, sharded?) — FSDP2 shards dim 0 in torch.chunk pieces."""
    if not isinstance(t, DTensor):
        return t, list(t.shape), False
    if len(t.placements) != 1 or not isinstance(t.placements[0], Shard) or t.placements[0].dim:
        raise CheckpointError(f"tensor placements {t.placements} not supported (dim-0 shards)")
    return t.to_local(), list(t.shape), True


def _collect(model: nn.Module, optimizer, rank: int, world: int):
    """This rank's (name, tensor, kind, global shape, sharded) entries, and JSON state."""
    entries = []
    names = {id(p): n for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        local, shape, sharded = _shard_info(p.detach(), rank)
        if sharded or rank == 0:
            entries.append((f"param/{n}", local, "param", shape, sharded))
    for n, b in model.named_buffers():
        if rank == 0:
            entries.append((f"buffer/{n}", b.detach(), "buffer", list(b.shape), False))
    opt_json: dict[str, Any] = {}
    if optimizer is not None:
        sd = optimizer.state_dict()
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        groups = []
        for g in sd["param_groups"]:
            groups.append({k: v for k, v in g.items() if k != "params"}
                          | {"params": [order[i] for i in g["params"]]})  # fmt: skip
        other: dict[str, dict[str, Any]] = {}
        for idx, state in sd["state"].items():
            pname = order[idx]
            for key, v in state.items():
                if isinstance(v, torch.Tensor):
                    local, shape, sharded = _shard_info(v.detach(), rank)
                    if sharded or rank == 0:
                        entries.append((f"optim/{pname}/{key}", local, "optim", shape, sharded))
                else:
                    other.setdefault(pname, {})[key] = v
        opt_json = {"param_groups": groups, "state": other}
    rng = torch.get_rng_state()
    entries.append((f"rng/{rank}", rng, "rng", list(rng.shape), False))
    return entries, opt_json


def save_sharded(
    path: str | Path,
    model: nn.Module,
    optimizer=None,
    *,
    step: int,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
    units: list[str] | None = None,
    blocking: bool = True,
) -> Path | AsyncSave:
    """Save this rank's shards (call on every rank); returns the published directory, or with
    ``blocking=False`` an :class:`AsyncSave` whose ``wait()`` returns it.

    ``units`` (e.g. ``plan.units``) are recorded so that ``reslice`` writes one file per unit.

    ``blocking=False`` returns once this rank's state is staged: copied off the training
    tensors to host memory (one more copy of the rank's shard, held until written); a
    background thread then writes, fsyncs and publishes with the same rules (manifest last,
    atomic rename, keep-last), coordinating ranks over a gloo group of its own so the
    training's collectives are not disturbed. At most one save is in flight per process: any
    save first waits for the previous one (and raises its error, if it failed). A process
    killed mid-save leaves only a ``.partial`` directory, as a blocking save does.

    Bytes written per rank: its local shards (≈ model and optimizer state ÷ world size), plus
    replicated tensors on rank 0. Memory (blocking): one tensor at a time beyond the model's.
    """
    wait_for_saves()
    rank, world = _dist()
    path = Path(path)
    if rank == 0 and path.exists():
        raise CheckpointError(f"{path}: exists; checkpoints are never overwritten")
    entries, opt_json = _collect(model, optimizer, rank, world)
    meta = {"step": step, "extra": extra, "keep_last": keep_last, "units": units}
    if blocking:
        _write(path, entries, opt_json, meta, group=None)
        return path
    # Staging: host copies of everything the writer reads; JSON state copied by value.
    staged = [(n, t.detach().to("cpu", copy=True), *rest) for n, t, *rest in entries]
    meta = json.loads(json.dumps(meta))
    opt_json = json.loads(json.dumps(opt_json))
    group = side_group() if world > 1 else None
    return AsyncSave.start(path, lambda: _write(path, staged, opt_json, meta, group=group))


def _write(path: Path, entries, opt_json, meta: dict[str, Any], group) -> Path:
    """Write ``entries`` under ``.<name>.partial`` and publish it as ``path`` (rank 0)."""
    rank, world = _dist()
    tmp = path.parent / f".{path.name}.partial"
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by an interrupted save of the same name
        tmp.mkdir()
    _barrier(group)
    fname = f"rank_{rank:05d}.safetensors"
    index = write_safetensors(tmp / fname, [(n, t) for n, t, *_ in entries])
    mine = {
        "file": fname,
        "bytes": (tmp / fname).stat().st_size,
        "tensors": {n: (index[n], kind, shape, sharded) for n, _, kind, shape, sharded in entries},
        "rows": {n: t.shape[0] if t.dim() else 0 for n, t, *_ in entries},
    }
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, mine, group=group)
    else:
        gathered = [mine]
    if rank == 0:
        manifest = _manifest(gathered, world, meta["step"], meta["extra"], opt_json)
        if meta["units"] is not None:
            manifest["units"] = list(meta["units"])
        mf = tmp / MANIFEST
        with open(mf, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        os.rename(tmp, path)  # atomic publish: the checkpoint is complete from here on
        fsync_dir(path.parent)
        if meta["keep_last"]:
            _prune(path.parent, meta["keep_last"], keep=path)
    _barrier(group)
    return path


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    """Remove all but the newest ``keep_last`` checkpoints, crash-safely: a checkpoint is first
    renamed out of sight (atomic; loaders skip dot-names), then deleted. A kill mid-delete
    leaves a ``.deleting`` directory, never a complete-looking checkpoint missing files."""
    for stale in root.glob(".*.deleting"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep_last]:
        if old != keep:
            doomed = old.with_name(f".{old.name}.deleting")
            os.rename(old, doomed)
            shutil.rmtree(doomed)


def _manifest(gathered, world, step, extra, opt_json) -> dict[str, Any]:
    tensors: dict[str, Any] = {}
    for r, info in enumerate(gathered):
        for name, (idx, kind, shape, sharded) in info["tensors"].items():
            t = tensors.setdefault(name, {"kind": kind, "dtype": idx["dtype"], "shape": shape,
                                          "sharded": sharded, "shards": []})  # fmt: skip
            offset = dim0_rows(shape[0], world, r)[0] if sharded else 0
            t["shards"].append({"file": info["file"], "rank": r, "row_offset": offset,
                                "rows": info["rows"][name], "offsets": idx["offsets"],
                                "crc32": idx["crc32"]})  # fmt: skip
    return {
        "format": FORMAT,
        "version": VERSION,
        "world_size": world,
        "step": step,
        "created_unix_s": time.time(),
        "extra": extra or {},
        "files": {g["file"]: {"rank": r, "bytes": g["bytes"]} for r, g in enumerate(gathered)},
        "optimizer": opt_json,
        "tensors": tensors,
    }


_STEP = re.compile(r"(\d+)$")


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints (a manifest present) directly under ``root``, oldest step first."""
    root = Path(root)
    found = []
    for d in root.iterdir() if root.is_dir() else []:
        if d.is_dir() and not d.name.startswith(".") and (d / MANIFEST).is_file():
            try:
                found.append((read_manifest(d)["step"], d))
            except CheckpointError:
                continue  # a corrupt manifest is not a checkpoint to resume from
    return [d for _, d in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (None if there is none)."""
    done = list_checkpoints(root)
    return done[-1] if done else None


def load_sharded(path: str | Path, model: nn.Module, optimizer=None, *, verify_checksums=True):
    """Restore model (and optimizer) state saved by :func:`save_sharded` on the same world
    size, each rank reading its own file. Returns the manifest (``step``, ``extra``, ...).

    Raises CheckpointError for an incomplete or corrupt checkpoint, another world size (use
    ``ckpt reslice`` and ``load_sliced``), or tensors that do not match the model.
    """
    rank, world = _dist()
    path = Path(path)
    manifest = read_manifest(path)
    if manifest["world_size"] != world:
        raise CheckpointError(
            f"{path}: saved on world size {manifest['world_size']}, loading on {world}; "
            "reslice it (ckpt reslice) and load the slices (load_sliced)"
        )
    # Each rank checks the two files it reads (its own, and rank 0's replicated tensors), in
    # parallel; then every rank raises the same error, so none waits for a failed peer.
    reads = {f"rank_{r:05d}.safetensors" for r in (0, rank)}
    try:
        verify(path, checksums=verify_checksums, files=reads)
        error = None
    except CheckpointError as e:
        error = str(e)
    errors = [error]
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
    if any(errors):
        raise CheckpointError(next(e for e in errors if e))
    targets: dict[str, torch.Tensor] = {f"param/{n}": p for n, p in model.named_parameters()}
    targets |= {f"buffer/{n}": b for n, b in model.named_buffers()}
    missing = [n for n in targets if n not in manifest["tensors"]]
    if missing:
        raise CheckpointError(f"{path}: no tensor {missing[0]} in the checkpoint (another model?)")
    files = {r: path / f"rank_{r:05d}.safetensors" for r in (0, rank)}
    with safe_open(files[rank], "pt") as mine, safe_open(files[0], "pt") as first:
        for name, dst in targets.items():
            meta = manifest["tensors"][name]
            if list(dst.shape) != meta["shape"]:
                raise CheckpointError(
                    f"{files[rank]}: tensor {name}: shape {meta['shape']} in the checkpoint, "
                    f"{list(dst.shape)} in the model (another model?)"
                )
            src = mine if meta["sharded"] else first
            local = dst.to_local() if isinstance(dst, DTensor) else dst
            with torch.no_grad():
                local.copy_(src.get_tensor(name))
        if optimizer is not None:
            tensors = {
                name: ((mine if meta["sharded"] else first).get_tensor(name), meta["sharded"])
                for name, meta in manifest["tensors"].items()
                if meta["kind"] == "optim"
            }
            restore_optimizer(manifest, model, optimizer, tensors)
        torch.set_rng_state(mine.get_tensor(f"rng/{rank}"))
    return manifest
