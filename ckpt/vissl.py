"""SEER weights in: a VISSL RegNetY checkpoint → fsdpkit sliced checkpoint.

VISSL (``vissl/utils/checkpoint.py``) writes two kinds of file a SEER user holds:

- consolidated: one ``.torch`` file ``{"type": "consolidated", "classy_state_dict":
  {"base_model": {"model": {"trunk": {...}, "heads": {...}}}}}``;
- sliced: a ``slice_list`` file of the same shape whose values are *absolute* paths of
  ``<file stem>_layers/<sha1 of the parameter path>.torch`` files ``{"type": "slice",
  "weight": tensor}``. The paths are ignored here and re-derived from the sha1 of each key, so
  a moved folder still loads.

Trunk keys follow ClassyVision's AnyNet under VISSL's ``_feature_blocks``: the stem is
``conv1.stem.{0: conv, 1: BN}``, stage ``s`` (from 1) is ``res{s+1}``, its block ``i`` is
``block{s}-{i}`` with ``proj``/``bn`` (shortcut), ``f.a.{0,1}``, ``f.b.{0,1}``,
``f.se.excitation.{0,2}``, ``f.c``, ``f.final_bn``; ``regnet_fsdp`` with
``stage_checkpoints`` nests the blocks of a stage in ``block{s}-part{g}`` groups. Head keys
are ``0.projection_head.{j}`` (SwAV MLP) and ``0.prototypes0``. Files are read with
``torch.load(weights_only=True, mmap=True)``: nothing in them executes and tensors are mapped,
not copied, until each unit file is written.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kitcore import FsdpkitError, get_model_spec

from ._format import CheckpointError, write_safetensors
from .export import _staged, _write_json
from .sliced import unit_of
from .verify import MANIFEST, SLICED_FORMAT

__all__ = ["import_vissl", "map_vissl_keys", "vissl_slice_file"]

# our module → VISSL module, inside a stem and inside a block
_STEM = {"conv": "stem.0", "bn": "stem.1"}
_BLOCK = {"proj": "proj", "proj_bn": "bn", "a": "f.a.0", "a_bn": "f.a.1", "b": "f.b.0",
          "b_bn": "f.b.1", "se.reduce": "f.se.excitation.0", "se.expand": "f.se.excitation.2",
          "c": "f.c", "c_bn": "f.final_bn"}  # fmt: skip
# wrapper names that FSDP (fairscale) leaves in unconsolidated paths, and -part groups
_DROPPED = re.compile(r"^(_fsdp_wrapped_module|_fpw_module|block\d+-part\d+)$")
_ROOT = ("classy_state_dict", "base_model", "model")


def _vissl_name(name: str, model: nn.Module) -> tuple[str, str] | None:
    """``("trunk" | "heads", VISSL key without -part groups)`` of one of our state-dict names
    (``trunk.units.3.a_bn.weight``), or None for a name VISSL has no counterpart for."""
    if name.startswith("trunk.units."):
        index, _, leaf = name.removeprefix("trunk.units.").partition(".")
        module, _, attr = leaf.rpartition(".")
        info = model.trunk.unit_info[int(index)]
        if info.kind == "stem" and module in _STEM:
            return "trunk", f"_feature_blocks.conv1.{_STEM[module]}.{attr}"
        if info.kind == "block" and module in _BLOCK:
            s, i = info.stage, info.index_in_stage
            return "trunk", f"_feature_blocks.res{s + 1}.block{s}-{i}.{_BLOCK[module]}.{attr}"
        return None
    if name.startswith("head.mlp."):
        return "heads", "0.projection_head." + name.removeprefix("head.mlp.")
    if name == "prototypes.weight":
        return "heads", "0.prototypes0.weight"
    return None


def _canonical(key: str) -> str:
    return ".".join(p for p in key.split(".") if not _DROPPED.match(p))


def map_vissl_keys(
    model: nn.Module, trunk: Mapping[str, Any], heads: Mapping[str, Any]
) -> dict[str, tuple[str, str]]:
    """Match a VISSL checkpoint's keys to a RegNetY SwAV ``model`` (any device, ``meta`` too).

    ``trunk`` / ``heads``: the checkpoint's dicts, key → tensor (its shape is checked) or
    anything else (a slice file path: checked when read). Returns our tensor name
    (``param/trunk.units.0.conv.weight``, ``buffer/…``) → (``"trunk"`` | ``"heads"``, the
    checkpoint's key). CheckpointError (one line, naming the key) for a key missing on either
    side, a key found twice, or a shape that differs.
    """
    if not hasattr(getattr(model, "trunk", None), "unit_info"):
        raise CheckpointError(f"{type(model).__name__}: not a RegNetY SwAV model (no trunk units)")
    found: dict[tuple[str, str], str] = {}
    for section, keys in (("trunk", trunk), ("heads", heads)):
        for key in keys:
            canon = (section, _canonical(key))
            if canon in found:
                raise CheckpointError(f"VISSL {section} key {key}: also present as {found[canon]}")
            found[canon] = key
    plan: dict[str, tuple[str, str]] = {}
    ours = [("param", n, t) for n, t in model.named_parameters()]
    ours += [("buffer", n, t) for n, t in model.named_buffers()]
    for kind, name, t in ours:
        canon = _vissl_name(name, model)
        if canon is None or canon not in found:
            want = canon[1] if canon else "(none known)"
            raise CheckpointError(
                f"VISSL checkpoint: no key {want} for our {name} (another model?)"
            )
        key = found.pop(canon)
        value = (trunk if canon[0] == "trunk" else heads)[key]
        if isinstance(value, torch.Tensor):
            _check_shape(canon[0], key, value, list(t.shape))
        plan[f"{kind}/{name}"] = (canon[0], key)
    if found:
        (section, _), key = next(iter(found.items()))
        raise CheckpointError(
            f"VISSL {section} key {key}: not in the model (another model or head layout?)"
        )
    return plan


def _check_shape(section: str, key: str, value: torch.Tensor, shape: list[int]) -> None:
    if list(value.shape) != shape:
        raise CheckpointError(
            f"VISSL {section} key {key}: shape {list(value.shape)}, the model wants {shape} "
            "(another model?)"
        )


def vissl_slice_file(src: str | Path, key: str) -> Path:
    """Where VISSL's sliced checkpoint ``src`` keeps the tensor of ``key``:
    ``<src without suffix>_layers/<sha1(key)>.torch`` (head keys carry their ``0.`` prefix)."""
    src = Path(src)
    return src.with_name(src.stem + "_layers") / f"{hashlib.sha1(key.encode()).hexdigest()}.torch"


def _load(path: Path) -> Any:
    """``torch.load`` with nothing executed: only tensors, containers and plain values."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # a pre-1.6 (non-zip) file cannot be mapped: read it, still without executing code
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "")
        raise CheckpointError(
            f"{path}: holds more than tensors and plain values ({why[:160]}); nothing was "
            "executed — re-save it with tensors only"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable torch file (truncated?): {first}") from None


def _sections(src: Path, cp: Any) -> tuple[str, dict, dict]:
    """(VISSL type, trunk dict, heads dict with ``0.``-prefixed keys)."""
    if not isinstance(cp, dict):
        raise CheckpointError(f"{src}: not a VISSL checkpoint (a {type(cp).__name__})")
    kind = cp.get("type", "consolidated")  # VISSL's default for files saved before types
    if kind == "slice_list" and "classy_state_dict" not in cp:
        layers = cp.get("layers")  # VISSL's older slice lists: trunk paths under "layers"
        if not isinstance(layers, dict):
            raise CheckpointError(f"{src}: VISSL slice list without classy_state_dict or layers")
        return kind, layers, {}
    if kind not in ("consolidated", "slice_list"):
        raise CheckpointError(
            f"{src}: VISSL {kind} checkpoint not supported; consolidate it with VISSL first"
        )
    node = cp
    for i, part in enumerate(_ROOT):
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            raise CheckpointError(f"{src}: no {'.'.join(_ROOT[: i + 1])} (not a VISSL model file)")
    trunk, heads = node.get("trunk"), node.get("heads", {})
    if not isinstance(trunk, dict):
        raise CheckpointError(f"{src}: no {'.'.join(_ROOT)}.trunk")
    if isinstance(heads, list):  # one state dict per head
        heads = {f"{h}.{k}": v for h, sd in enumerate(heads) for k, v in sd.items()}
    return kind, trunk, heads


def _tensor(src: Path, kind: str, section: str, key: str, value: Any) -> torch.Tensor:
    if kind == "consolidated":
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{src}: VISSL {section} key {key}: not a tensor")
        return value
    path = vissl_slice_file(src, key)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the slice of VISSL {section} key {key})")
    piece = _load(path)
    if not (isinstance(piece, dict) and piece.get("type") == "slice"):
        raise CheckpointError(f"{path}: not a VISSL slice (of {section} key {key})")
    if not isinstance(piece.get("weight"), torch.Tensor):
        raise CheckpointError(f"{path}: VISSL slice of {section} key {key} holds no tensor")
    return piece["weight"]


def import_vissl(src: str | Path, dst: str | Path, *, model: str) -> dict[str, Any]:
    """Convert VISSL checkpoint ``src`` (consolidated, or a sliced checkpoint's slice list)
    of registered RegNetY SwAV model ``model`` (``rg8gf`` … ``regnet10b``) into the fsdpkit
    sliced checkpoint ``dst``, one safetensors file per unit, which ``load_sliced`` loads on
    any world size.

    Memory: every file is memory-mapped (a sliced checkpoint's slices one unit at a time) and
    each unit file is written straight from the mapped pages, so anonymous memory stays small
    (measured: +2 MiB importing rg8gf's 257 MiB); the mapped pages of one unit are page cache
    (regnet10b's largest unit is 6.9 GiB in FP32). The model is built on ``meta`` only to
    read names and shapes. Returns a
    summary: ``dst``, ``model``, ``vissl_type``, ``units``, ``tensors``, ``bytes``. Raises
    CheckpointError, with nothing left at ``dst``, for a missing key, a shape that differs,
    a missing or unreadable slice, or ``dst`` existing.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise CheckpointError(f"{dst}: exists; checkpoints are never overwritten")
    try:
        spec = get_model_spec(model)
        net = spec.build_model("meta")
        units = [n for n, _ in spec.named_units(net)]
    except FsdpkitError as e:
        raise CheckpointError(str(e)) from None
    if not src.is_file():
        raise CheckpointError(f"{src}: no such VISSL checkpoint file")
    kind, trunk, heads = _sections(src, _load(src))
    plan = map_vissl_keys(net, trunk, heads)
    shapes = {f"param/{n}": list(p.shape) for n, p in net.named_parameters()}
    shapes |= {f"buffer/{n}": list(b.shape) for n, b in net.named_buffers()}
    by_unit: dict[str, list[str]] = {}
    for name in plan:
        by_unit.setdefault(unit_of(name, units), []).append(name)
    files, tensors = {}, {}
    with _staged(dst) as tmp:
        for i, (unit, names) in enumerate(by_unit.items()):
            batch = []
            for name in names:
                section, key = plan[name]
                value = (trunk if section == "trunk" else heads)[key]
                t = _tensor(src, kind, section, key, value)
                _check_shape(section, key, t, shapes[name])
                batch.append((name, t))
            fname = f"unit_{i:05d}.safetensors"
            index = write_safetensors(tmp / fname, batch)
            del batch
            files[fname] = {"unit": unit, "bytes": (tmp / fname).stat().st_size}
            for name in names:
                tensors[name] = {"unit": unit, "file": fname, **index[name],
                                 "kind": name.split("/", 1)[0]}  # fmt: skip
        manifest = {
            "format": SLICED_FORMAT,
            "version": 1,
            "source_world_size": 1,
            "step": 0,
            "extra": {"imported_from": f"vissl {kind}", "source": str(src), "model": model},
            "optimizer": {},
            "units": list(by_unit),
            "files": files,
            "tensors": tensors,
        }
        _write_json(tmp / MANIFEST, manifest)
    return {
        "dst": str(dst),
        "model": model,
        "vissl_type": kind,
        "units": len(by_unit),
        "tensors": len(tensors),
        "bytes": sum(f["bytes"] for f in files.values()),
    }
