"""Crash-safe sharded checkpoints for training: every rank writes its own shard.

``save_sharded(path, model, optimizer, step=...)`` on every rank writes, under a temporary
directory next to ``path``:

- ``rank_NNNNN.safetensors``: that rank's pieces of parameters and optimizer state, and the
  rank's RNG state; fsynced;
- ``manifest.json`` last, by rank 0: format version, world size, step, user ``extra``, the
  optimizer's non-tensor state, and per tensor its global shape, dtype, and every shard's file,
  offset along dim 0, byte range and CRC-32; fsynced with the directory.

Who writes what follows each tensor's own layout (``_format.local_rows``), not the default
group: a DTensor is cut along dim 0 on the mesh dimension whose placement is ``Shard(0)``
(shard ``mesh.get_local_rank(dim)`` of ``mesh.size(dim)``, ``torch.chunk`` pieces), and only
the copy at coordinate 0 on every ``Replicate`` dimension writes it: under HSDP
(``(Replicate(), Shard(0))`` on a replicate × shard mesh) the first replica group writes the
rows, once, and the other groups write only their RNG state. One copy per row range means the
files hold each byte once and the manifest tiles every tensor's rows exactly once, as
``reslice`` and ``export`` read it; whether a rank writes is decided from its mesh coordinate
alone (no extra collective), and crash safety is unchanged (manifest last, atomic rename). A
fully replicated DTensor is written whole by its mesh's first rank; plain tensors (buffers,
unsharded parameters) by rank 0. Copies that no mesh relates (say ``fully_shard`` on
``mesh["shard"]``, one 1-D mesh per replica group) are written by each group; the manifest
records the lowest rank's and the others' bytes stay unreferenced in their files. The
on-disk format is the same as for a 1-D mesh over the world, whose checkpoints are unchanged.

Then rank 0 publishes by an atomic ``rename`` to ``path``. A checkpoint is complete exactly
when its manifest exists; an interrupted save leaves only a ``.partial`` directory, which
loaders ignore and the next save of that name clears. ``path`` is never overwritten.
``keep_last=N`` then removes older complete checkpoints beside it, each renamed out of sight
before it is deleted (so a crash mid-delete cannot leave a complete-looking partial one).
Barriers, the gather of per-rank indexes and publishing run over the whole world.

``load_sharded`` reads, for each tensor, the rows that this rank's piece covers (by the
model's own layout) from whichever files hold them: a checkpoint loads into any layout on the
same world size (the per-rank RNG state ties it to the world size).

``blocking=False`` stages the rank's state (host copies) and returns; a background thread
writes and publishes by the same rules (``ckpt._async``), one save in flight per process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor

from ._async import AsyncSave, side_group, wait_for_saves
from ._format import CheckpointError, fsync_dir, local_rows, write_safetensors
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


def _entry(name: str, t: torch.Tensor, kind: str, rank: int) -> tuple | None:
    """``(name, local tensor, kind, global shape, sharded, row offset, (piece index, count))``
    if this rank writes ``t`` (see the module docstring), else None."""
    t = t.detach()
    if not isinstance(t, DTensor):  # a plain tensor: every rank holds all of it
        return (name, t, kind, list(t.shape), False, 0, (0, 1)) if rank == 0 else None
    rows = local_rows(t, name)  # raises for placements other than Shard(0) / Replicate
    if not rows.writer:
        return None
    piece = (rows.index, rows.count)
    return name, t.to_local(), kind, list(t.shape), rows.sharded, rows.begin, piece


def _collect(model: nn.Module, optimizer, rank: int):
    """This rank's entries (``_entry``) and the optimizer's JSON state."""
    entries = []
    names = {id(p): n for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        entries.append(_entry(f"param/{n}", p, "param", rank))
    for n, b in model.named_buffers():
        entries.append(_entry(f"buffer/{n}", b, "buffer", rank))
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
                    entries.append(_entry(f"optim/{pname}/{key}", v, "optim", rank))
                else:
                    other.setdefault(pname, {})[key] = v
        opt_json = {"param_groups": groups, "state": other}
    rng = torch.get_rng_state()
    entries.append((f"rng/{rank}", rng, "rng", list(rng.shape), False, 0, (0, 1)))
    return [e for e in entries if e is not None], opt_json


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
    model_name: str | None = None,
) -> Path | AsyncSave:
    """Save this rank's shards (call on every rank); returns the published directory, or with
    ``blocking=False`` an :class:`AsyncSave` whose ``wait()`` returns it.

    ``units`` (e.g. ``plan.units``) are recorded so that ``reslice`` writes one file per unit;
    ``model_name`` (the registry name of the model) is recorded as the manifest's ``model``
    and carried into slices, so a loader knows what to build.

    ``blocking=False`` returns once this rank's state is staged: copied off the training
    tensors to host memory (one more copy of the rank's shard, held until written); a
    background thread then writes, fsyncs and publishes with the same rules (manifest last,
    atomic rename, keep-last), coordinating ranks over a gloo group of its own so the
    training's collectives are not disturbed. At most one save is in flight per process: any
    save first waits for the previous one (and raises its error, if it failed). A process
    killed mid-save leaves only a ``.partial`` directory, as a blocking save does.

    Bytes written per rank: its local shards (≈ model and optimizer state ÷ shard count) if it
    is in the first copy along every replicated mesh dimension, plus plain (replicated) tensors
    on rank 0; its RNG state. Memory (blocking): one tensor at a time beyond the model's.
    """
    wait_for_saves()
    rank, world = _dist()
    path = Path(path)
    if rank == 0 and path.exists():
        raise CheckpointError(f"{path}: exists; checkpoints are never overwritten")
    entries, opt_json = _collect(model, optimizer, rank)
    meta = {"step": step, "extra": extra, "keep_last": keep_last, "units": units,
            "model": model_name}  # fmt: skip
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
        "tensors": {n: (index[n], *rest) for n, _, *rest in entries},
        "rows": {n: t.shape[0] if t.dim() else 0 for n, t, *_ in entries},
    }
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, mine, group=group)
    else:
        gathered = [mine]
    # every rank builds (and checks) the tensor table, so that all raise the same error
    tensors = _tensor_table(gathered, path)
    if rank == 0:
        manifest = _manifest(gathered, world, meta["step"], meta["extra"], opt_json, tensors)
        if meta["units"] is not None:
            manifest["units"] = list(meta["units"])
        if meta.get("model") is not None:
            manifest["model"] = str(meta["model"])  # the registry name the model was built from
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


def _tensor_table(gathered, path: Path) -> dict[str, Any]:
    """The manifest's ``tensors`` from every rank's index: per tensor its shards in row order,
    one per piece (the same piece from several ranks is a copy outside the tensor's mesh: the
    lowest rank's is kept). Raises CheckpointError unless the shards tile each tensor's rows."""
    tensors: dict[str, Any] = {}
    pieces: dict[str, list[tuple]] = {}
    for r, info in enumerate(gathered):
        for name, (idx, kind, shape, sharded, offset, piece) in info["tensors"].items():
            t = tensors.setdefault(name, {"kind": kind, "dtype": idx["dtype"], "shape": shape,
                                          "sharded": sharded, "shards": []})  # fmt: skip
            shard = {"file": info["file"], "rank": r, "row_offset": offset,
                     "rows": info["rows"][name], "offsets": idx["offsets"],
                     "crc32": idx["crc32"]}  # fmt: skip
            pieces.setdefault(name, []).append((offset, tuple(piece), r, shard))
    for name, t in tensors.items():
        seen, pos = set(), 0
        for offset, piece, _, shard in sorted(pieces[name], key=lambda p: p[:3]):
            if piece in seen:
                continue  # the same piece again: a copy outside the tensor's mesh
            seen.add(piece)
            if offset != pos:
                pos = -1  # a gap or an overlap
                break
            t["shards"].append(shard)
            pos += shard["rows"]
        if pos != (t["shape"][0] if t["shape"] else 0):
            found = [(r, s["row_offset"], s["rows"]) for *_, r, s in pieces[name]]
            raise CheckpointError(
                f"{path}: tensor {name}: the ranks' pieces (rank, row offset, rows) {found} do "
                f"not tile its shape {t['shape']} along dim 0"
            )
    return tensors


def _manifest(gathered, world, step, extra, opt_json, tensors) -> dict[str, Any]:
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


def _pieces(path: Path, name: str, meta: dict[str, Any], rows: tuple[int, int]) -> list[tuple]:
    """``(file, first row, end row, whole shard?)`` within the shards that hold ``rows``
    (``[begin, end)`` of the global dim 0), in row order; one whole shard for a 0-dim tensor."""
    shards = sorted(meta["shards"], key=lambda sh: sh["row_offset"])
    if not meta["shape"]:
        return [(shards[0]["file"], 0, 0, True)]
    out, pos = [], rows[0]
    for shard in shards:
        begin, end = shard["row_offset"], shard["row_offset"] + shard["rows"]
        if begin <= pos < min(end, rows[1]):
            stop = min(end, rows[1])
            out.append((shard["file"], pos - begin, stop - begin, (pos, stop) == (begin, end)))
            pos = stop
    if pos != rows[1]:
        raise CheckpointError(
            f"{path / MANIFEST}: tensor {name}: no shard holds rows {pos} to {rows[1]} (corrupt)"
        )
    return out


def load_sharded(path: str | Path, model: nn.Module, optimizer=None, *, verify_checksums=True):
    """Restore model (and optimizer) state saved by :func:`save_sharded` on the same world
    size. Returns the manifest (``step``, ``extra``, ...).

    Each rank reads, for every tensor, the rows its piece covers by the model's own layout
    (``_format.local_rows``: its ``Shard(0)`` mesh dimension; all rows of replicated or plain
    tensors) from the files that hold them, so the model may be sharded on another mesh than
    at save time (HSDP ↔ FSDP, say), as long as the world size is the same.

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
    own = f"rank_{rank:05d}.safetensors"
    params = dict(model.named_parameters())
    targets: dict[str, torch.Tensor] = {f"param/{n}": p for n, p in params.items()}
    targets |= {f"buffer/{n}": b for n, b in model.named_buffers()}
    # name → (model tensor or None, laid out like a DTensor parameter?, pieces to read)
    plan: dict[str, tuple[torch.Tensor | None, bool, list[tuple]]] = {}
    # Each rank plans its reads and checks the files it reads (its own for the RNG state, and
    # those holding its rows), in parallel; then every rank raises the same error, so none
    # waits for a failed peer.
    try:
        missing = [n for n in targets if n not in manifest["tensors"]]
        if missing:
            raise CheckpointError(
                f"{path}: no tensor {missing[0]} in the checkpoint (another model?)"
            )
        for name, meta in manifest["tensors"].items():
            dst = targets.get(name)
            if dst is not None and list(dst.shape) != meta["shape"]:
                raise CheckpointError(
                    f"{path / own}: tensor {name}: shape {meta['shape']} in the checkpoint, "
                    f"{list(dst.shape)} in the model (another model?)"
                )
            if dst is None and not (meta["kind"] == "optim" and optimizer is not None):
                continue
            owner = name.removeprefix("optim/").rsplit("/", 1)[0]  # optim/<param>/<key>
            like = dst if dst is not None else params.get(owner)
            as_param = (
                dst is None
                and isinstance(like, DTensor)
                and bool(meta["shape"])
                and list(like.shape) == meta["shape"]
            )
            rows = (0, meta["shape"][0] if meta["shape"] else 0)
            if dst is not None or as_param:
                rows = local_rows(like, name)[:2]
            plan[name] = (dst, as_param, _pieces(path, name, meta, rows))
        reads = {own} | {f for _, _, pieces in plan.values() for f, *_ in pieces}
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
    with ExitStack() as stack:
        files: dict[str, Any] = {}

        def opened(f: str):
            if f not in files:
                files[f] = stack.enter_context(safe_open(path / f, "pt"))
            return files[f]

        loaded: dict[str, tuple[torch.Tensor, bool]] = {}
        for name, (dst, as_param, pieces) in plan.items():
            meta = manifest["tensors"][name]
            parts = [opened(f).get_tensor(name) if whole else opened(f).get_slice(name)[a:b]
                     for f, a, b, whole in pieces]  # fmt: skip
            if not parts:  # this rank holds no rows of it
                t = torch.empty([0, *meta["shape"][1:]], dtype=getattr(torch, meta["dtype"]))
            else:
                t = parts[0] if len(parts) == 1 else torch.cat(parts)
            if dst is None:
                loaded[name] = (t, as_param)
                continue
            local = dst.to_local() if isinstance(dst, DTensor) else dst
            with torch.no_grad():
                local.copy_(t)
        if optimizer is not None:
            restore_optimizer(manifest, model, optimizer, loaded)
        torch.set_rng_state(opened(own).get_tensor(f"rng/{rank}"))
    return manifest
