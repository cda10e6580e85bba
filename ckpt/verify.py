"""Reading and checking checkpoint manifests: completeness, sizes, checksums, safe paths."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

from ._format import CheckpointError, crc32_of_range, read_header
from .dcp import is_dcp, read_dcp_manifest

__all__ = [
    "FORMAT",
    "SLICED_FORMAT",
    "VERSION",
    "inspect",
    "read_manifest",
    "read_sliced_manifest",
    "verify",
]

FORMAT = "fsdpkit-sharded"
SLICED_FORMAT = "fsdpkit-sliced"
VERSION = 1
MANIFEST = "manifest.json"


def _safe_file(root: Path, name: str) -> Path:
    """A file the manifest names, refused if it would leave the checkpoint directory."""
    if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
        raise CheckpointError(f"{root / MANIFEST}: file name {name!r} leaves the checkpoint")
    return root / name


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint; CheckpointError (one line) otherwise."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such checkpoint directory")
    mf = root / MANIFEST
    if not mf.is_file():
        raise CheckpointError(
            f"{root}: not a complete checkpoint (no {MANIFEST}; an interrupted save?)"
        )
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{mf}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mf}: not an fsdpkit sharded checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{mf}: format version {manifest.get('version')}, this fsdpkit reads {VERSION}"
        )
    for name in manifest.get("files", {}):
        _safe_file(root, name)
    return manifest


def read_sliced_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a complete sliced checkpoint (``ckpt reslice``); CheckpointError
    (one line) otherwise."""
    root = Path(path)
    mf = root / MANIFEST
    try:
        manifest = json.loads(mf.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{root}: not a complete sliced checkpoint (no {MANIFEST})") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{mf}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SLICED_FORMAT:
        raise CheckpointError(f"{mf}: not an fsdpkit sliced checkpoint")
    for name in manifest["files"]:
        _safe_file(root, name)
    return manifest


def _either(root: Path) -> tuple[str, dict[str, Any]]:
    """``("sharded" | "sliced" | "dcp", manifest)``, the sliced one seen as one shard per
    tensor, a DCP one as one shard per chunk."""
    if is_dcp(root):
        return "dcp", read_dcp_manifest(root)
    try:
        fmt = json.loads((root / MANIFEST).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None  # read_manifest below gives the precise one-line error
    if fmt != SLICED_FORMAT:
        return "sharded", read_manifest(root)
    sliced = read_sliced_manifest(root)
    tensors = {
        n: {**t, "shards": [{"file": t["file"], "offsets": t["offsets"], "crc32": t["crc32"]}]}
        for n, t in sliced["tensors"].items()
    }
    return "sliced", sliced | {"world_size": sliced["source_world_size"], "tensors": tensors}


def verify(
    path: str | Path, *, checksums: bool = True, files: Collection[str] | None = None
) -> dict[str, Any]:
    """Check that every file of a sharded, sliced or DCP checkpoint is present with its size
    and header, and (``checksums``) that every tensor's bytes match their CRC-32 (only in
    ``files``, when given: what one rank reads). Returns the manifest (a sliced one with one
    ``shards`` entry per tensor, a DCP one with one per chunk); raises CheckpointError naming
    the first file and tensor at fault."""
    root = Path(path)
    kind, manifest = _either(root)
    for name, info in manifest["files"].items():
        f = _safe_file(root, name)
        if not f.is_file():
            owner = f"rank {info['rank']}'s shard" if "rank" in info else f"unit {info['unit']}"
            raise CheckpointError(f"{f}: missing ({owner})")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, the manifest says {info['bytes']}")
        if kind != "dcp":  # DCP's records were parsed by read_dcp_manifest
            read_header(f)
    if checksums:
        for tname, t in manifest["tensors"].items():
            for shard in t["shards"]:
                if files is not None and shard["file"] not in files:
                    continue
                f = _safe_file(root, shard["file"])
                begin, end = shard["offsets"]
                if crc32_of_range(f, begin, end) != shard["crc32"]:
                    raise CheckpointError(f"{f}: tensor {tname}: checksum mismatch (corrupt)")
    return manifest


def inspect(path: str | Path) -> dict[str, Any]:
    """A summary of a sharded, sliced or DCP checkpoint: step (None for DCP), (source) world
    size, tensors by kind with dtypes and bytes, total bytes, units (sliced)."""
    kind, manifest = _either(Path(path))
    kinds: dict[str, dict[str, int]] = {}
    dtypes: dict[str, int] = {}
    for t in manifest["tensors"].values():
        k = kinds.setdefault(t["kind"], {"tensors": 0, "bytes": 0})
        nbytes = sum(s["offsets"][1] - s["offsets"][0] for s in t["shards"])
        k["tensors"] += 1
        k["bytes"] += nbytes
        dtypes[t["dtype"]] = dtypes.get(t["dtype"], 0) + nbytes
    return {
        "path": str(path),
        "kind": kind,
        "format": manifest["format"],
        "version": manifest["version"],
        "step": manifest["step"],
        "world_size": manifest["world_size"],
        "files": len(manifest["files"]),
        "kinds": kinds,
        "dtypes": dtypes,
        "total_bytes": sum(f["bytes"] for f in manifest["files"].values()),
        "units": len(manifest.get("units", [])),
        "extra": manifest.get("extra", {}),
    }
