"""PyTorch DCP checkpoints in: ``verify``, ``inspect`` and ``reslice`` read a directory written by
``torch.distributed.checkpoint.save`` (``.metadata`` + ``__R_F.distcp``), with no process group.

DCP's layout: ``.metadata`` gives each state-dict key's global shape, dtype and chunks (offsets
and sizes), and each chunk's byte range in one ``.distcp`` file, where it is an uncompressed
``torch.save`` zip whose data entry carries a CRC-32 (zlib's). FSDP2 shards dim 0, so a
tensor's chunks are row blocks; DCP stores a replicated tensor (buffers, Adam's ``step``) once,
in *any* rank's file. ``read_dcp_manifest`` parses only the zip directories (a few hundred bytes
per chunk; nothing executes, see ``_dcp_meta``) and returns the manifest of our sharded format,
each chunk's data as a shard (file, byte range, CRC-32). ``reslice`` then streams it exactly as
it streams our own checkpoints: every chunk's CRC-32 checked on the way, each output tensor's
CRC-32 combined from its chunks'.

Names: ``planner_data`` (DCP's flattening map) gives each key's path in the saved dict. The
optimizer is the sub-dict holding ``state`` and ``param_groups`` (as
``torch.distributed.checkpoint.state_dict.get_state_dict`` returns it: keyed by parameter
name); its state becomes ``optim/<param>/<key>``. The model is the dict holding most other
tensors (``{"model": model.state_dict(), ...}`` or the top level); a tensor there is a
``param/`` if the optimizer lists it, else a ``buffer/`` (without optimizer state: BatchNorm's
running statistics are buffers, every other tensor a parameter). Any other tensor is ``extra/``
(counted by ``inspect``, not resliced).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ._dcp_meta import is_tensor_meta, load_metadata, read_item
from ._format import ST_DTYPES, CheckpointError

__all__ = ["DCP_FORMAT", "METADATA", "is_dcp", "read_dcp_manifest"]

DCP_FORMAT = "torch-dcp"
METADATA = ".metadata"
_RANK = re.compile(r"^__(\d+)_\d+\.distcp$")
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_BY_POSITION = (
    "optimizer state is keyed by position (optimizer.state_dict()); save it by parameter name "
    "(torch.distributed.checkpoint.state_dict.get_state_dict)"
)


def is_dcp(path: str | Path) -> bool:
    """A directory with DCP's ``.metadata`` (and no manifest of ours)."""
    root = Path(path)
    return (root / METADATA).is_file() and not (root / "manifest.json").exists()


class _Files:
    """The ``.distcp`` files, opened once each; errors name the file and the tensor."""

    def __init__(self, root: Path) -> None:
        self.root, self.fds, self.sizes = root, {}, {}

    def fd(self, name: str, begin: int, length: int, what: str) -> int:
        if name not in self.fds:
            try:
                self.fds[name] = os.open(self.root / name, os.O_RDONLY)
            except FileNotFoundError:
                raise CheckpointError(f"{self.root / name}: missing (holds {what})") from None
            except OSError as e:
                raise CheckpointError(f"{self.root / name}: unreadable ({e})") from None
            self.sizes[name] = os.fstat(self.fds[name]).st_size
        if begin + length > self.sizes[name]:
            raise CheckpointError(f"{self.root / name}: truncated ({self.sizes[name]} bytes): "
                                  f"{what} needs bytes [{begin}, {begin + length})")  # fmt: skip
        return self.fds[name]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def _storage(md, where: Path) -> tuple[dict, dict[str, int]]:
    """(key, chunk offsets) → (file, begin, length); and each file's expected size in bytes."""
    storage, ends = {}, {}
    for idx, info in md.storage_data.items():
        try:
            offset = None if idx.offset is None else tuple(int(o) for o in idx.offset)
            f, b, n = info.relative_path, int(info.offset), int(info.length)
            transforms = getattr(info, "transform_descriptors", None)
        except (AttributeError, TypeError, ValueError):
            raise CheckpointError(f"{where}: malformed storage entry {idx!r}") from None
        if not isinstance(f, str) or "/" in f or "\\" in f or f in ("", ".", ".."):
            raise CheckpointError(f"{where}: file name {f!r} leaves the checkpoint")
        if transforms:
            raise CheckpointError(f"{where}: {idx.fqn} is stored through {list(transforms)} "
                                  "(compressed or transformed: not supported)")  # fmt: skip
        if b < 0 or n < 0:
            raise CheckpointError(f"{where}: {idx.fqn}: negative byte range")
        storage[(idx.fqn, offset)] = (f, b, n)
        ends[f] = max(ends.get(f, 0), b + n)
    return storage, ends


def _path(planner_data: Any, key: str) -> tuple:
    """Where ``key`` sat in the saved (nested) dict, as DCP's flattening recorded it."""
    p = planner_data.get(key) if isinstance(planner_data, dict) else None
    if isinstance(p, tuple | list) and p and all(isinstance(c, str | int) for c in p):
        return tuple(p)
    return (key,)


def _optimizer_root(paths: dict[str, tuple]) -> tuple | None:
    """The path of the sub-dict holding both ``state`` and ``param_groups``."""
    roots = {p[:-3] for p in paths.values() if len(p) >= 3 and p[-3] == "state"}
    roots = [r for r in roots
             if any(q[: len(r) + 1] == (*r, "param_groups") for q in paths.values())]  # fmt: skip
    return min(roots, key=lambda r: (len(r), repr(r))) if roots else None


def _tensor(fqn: str, meta, storage: dict, files: _Files, where: Path) -> dict[str, Any]:
    """A tensor's manifest entry: its chunks (which must be dim-0 row blocks) as shards."""
    dtype = str(meta.properties.dtype).removeprefix("torch.")
    if dtype not in ST_DTYPES:
        raise CheckpointError(f"{where}: tensor {fqn}: dtype {dtype} not supported")
    shape = [int(n) for n in meta.size]
    shards, rows = [], 0
    for c in sorted(meta.chunks, key=lambda c: tuple(c.offsets)):
        off, size = [int(o) for o in c.offsets], [int(n) for n in c.sizes]
        if off[1:] != [0] * len(shape[1:]) or size[1:] != shape[1:] or (shape and off[0] != rows):
            raise CheckpointError(
                f"{where}: tensor {fqn}: chunk at {off} of size {size} is not a dim-0 row "
                "block (only FSDP's dim-0 shards are read)"
            )
        loc = storage.get((fqn, tuple(off)))
        if loc is None:
            raise CheckpointError(f"{where}: tensor {fqn}: no storage entry for its chunk at {off}")
        f, b, n = loc
        what = f"tensor {fqn}"
        fd = files.fd(f, b, n, what)
        got = read_item(fd, b, n, f"{files.root / f}: {what}", "tensor")
        if got[:2] != (dtype, size):
            raise CheckpointError(f"{files.root / f}: {what}: chunk holds {got[1]} {got[0]}, the "
                                  f"metadata says {size} {dtype}")  # fmt: skip
        m = _RANK.match(f)
        shards.append({"file": f, "rank": int(m.group(1)) if m else None,
                       "row_offset": off[0] if shape else 0, "rows": size[0] if shape else 0,
                       "offsets": list(got[2]), "crc32": got[3]})  # fmt: skip
        rows += size[0] if shape else 1
    if rows != (shape[0] if shape else 1):
        raise CheckpointError(f"{where}: tensor {fqn}: its chunks cover {rows} of "
                              f"{shape[0] if shape else 1} rows")  # fmt: skip
    return {"dtype": dtype, "shape": shape, "sharded": len(shards) > 1, "dcp_key": fqn,
            "shards": shards}  # fmt: skip


def _values(md, paths, storage, files: _Files, oroot: tuple | None) -> tuple[dict, str | None]:
    """Reads (CRC-checks) every non-tensor item; returns the optimizer's param groups and
    non-tensor state by parameter name, and why it cannot be used (None when it can)."""
    groups: dict[int, dict[str, Any]] = {}
    state: dict[str, dict[str, Any]] = {}
    n = len(oroot or ())
    for fqn, meta in md.state_dict_metadata.items():
        if is_tensor_meta(meta):
            continue
        if (fqn, None) not in storage:
            raise CheckpointError(f"{files.root / METADATA}: {fqn}: no storage entry")
        f, b, length = storage[(fqn, None)]
        p = paths[fqn]
        mine = oroot is not None and p[:n] == oroot and len(p) == n + 3
        where = f"{files.root / f}: {fqn}"
        fd = files.fd(f, b, length, fqn)
        value = read_item(fd, b, length, where, "value" if mine else "check")
        if mine and p[n] == "param_groups" and isinstance(p[n + 1], int):
            groups.setdefault(p[n + 1], {})[str(p[n + 2])] = value
        elif mine and p[n] == "state":
            state.setdefault(p[n + 1], {})[str(p[n + 2])] = value
    if oroot is None:
        return {}, "no optimizer state (a dict with 'state' and 'param_groups') in the checkpoint"
    param_groups = [groups[i] for i in sorted(groups)]
    if not all(isinstance(g.get("params"), list) for g in param_groups):
        return {}, "optimizer param_groups without a 'params' list"
    names = [x for g in param_groups for x in g["params"]]
    keyed = [p[n + 1] for p in paths.values() if p[:n] == oroot and len(p) == n + 3
             and p[n] == "state"]  # fmt: skip
    if not all(isinstance(x, str) for x in names + keyed):
        return {}, _BY_POSITION
    optimizer = {"param_groups": param_groups, "state": state}
    try:
        json.dumps(optimizer)
    except (TypeError, ValueError) as e:
        return {}, f"optimizer hyper-parameters are not plain values ({e})"
    return optimizer, None


def read_dcp_manifest(path: str | Path, *, need_optimizer: bool = False) -> dict[str, Any]:
    """The manifest (our sharded format's shape, ``format`` ``"torch-dcp"``) of the DCP
    checkpoint ``path``, each chunk a shard whose ``offsets`` are its data's byte range in its
    ``.distcp`` file and whose ``crc32`` is the zip directory's.

    Reads ``.metadata`` and each chunk's zip directory (≈1 KiB per chunk); non-tensor items
    (optimizer hyper-parameters) are read and CRC-checked whole. Raises CheckpointError naming
    the file and tensor for a missing or truncated file, a malformed record, a refused pickle
    global, chunks that are not dim-0 row blocks, and (``need_optimizer``) optimizer state that
    is absent or keyed by position.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such checkpoint directory")
    where = root / METADATA
    md = load_metadata(where)
    storage, ends = _storage(md, where)
    paths = {k: _path(md.planner_data, k) for k in md.state_dict_metadata}
    oroot = _optimizer_root(paths)
    files = _Files(root)
    try:
        optimizer, problem = _values(md, paths, storage, files, oroot)
        if need_optimizer and problem:
            raise CheckpointError(f"{root}: {problem}")
        n = len(oroot or ())
        in_optim = {k for k, p in paths.items() if oroot is not None and p[:n] == oroot}
        tensor_keys = {k for k in paths if is_tensor_meta(md.state_dict_metadata[k])}
        model = Counter(p[:-1] for k, p in paths.items() if k not in in_optim and k in tensor_keys)
        model_root = model.most_common(1)[0][0] if model else None
        params = {name for g in optimizer.get("param_groups", []) for name in g["params"]}
        tensors: dict[str, dict[str, Any]] = {}
        for fqn, meta in md.state_dict_metadata.items():
            if not is_tensor_meta(meta):
                continue
            p = paths[fqn]
            if fqn in in_optim and not problem and len(p) == n + 3 and p[n] == "state":
                kind, name = "optim", f"optim/{p[n + 1]}/{p[n + 2]}"
            elif p[:-1] == model_root and isinstance(p[-1], str):
                is_param = p[-1] in params if params else p[-1].rsplit(".")[-1] not in _BN_BUFFERS
                kind = "param" if is_param else "buffer"
                name = f"{kind}/{p[-1]}"
            else:
                kind, name = "extra", f"extra/{fqn}"
            tensors[name] = {"kind": kind, **_tensor(fqn, meta, storage, files, where)}
    finally:
        files.close()
    ranks = [int(m.group(1)) for f in ends if (m := _RANK.match(f))]
    return {
        "format": DCP_FORMAT,
        "version": str(md.version),
        "world_size": max(ranks) + 1 if ranks else len(ends),
        "step": None,
        "extra": {},
        "files": {
            f: {"bytes": e} | ({"rank": int(m.group(1))} if (m := _RANK.match(f)) else {})
            for f, e in sorted(ends.items())
        },
        "optimizer": optimizer,
        "tensors": tensors,
    }
