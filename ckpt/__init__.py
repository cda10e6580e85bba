"""ckpt: crash-safe sharded checkpoints for training, verification and inspection.

``save_sharded`` / ``load_sharded`` on every rank; ``latest_checkpoint`` for resuming;
``verify`` (completeness, sizes, per-tensor CRC-32) and ``inspect`` for tools. Metadata is
JSON and tensors are safetensors: nothing is unpickled. ``reslice`` streams a sharded
checkpoint into per-unit slices; ``load_sliced`` loads them on any world size. ``verify``,
``inspect`` and ``reslice`` also read PyTorch DCP checkpoints (``read_dcp_manifest``), with
an allow-listed unpickler for DCP's ``.metadata``. ``export_hf`` writes what Hugging Face
loaders read; ``import_vissl`` turns SEER/VISSL weights into slices.
"""

from ._format import CheckpointError
from .dcp import is_dcp, read_dcp_manifest
from .export import export_hf
from .sharded import (
    AsyncSave,
    latest_checkpoint,
    list_checkpoints,
    load_sharded,
    save_sharded,
    wait_for_saves,
)
from .sliced import load_sliced, reslice, unit_of
from .verify import inspect, read_manifest, read_sliced_manifest, verify
from .vissl import import_vissl, map_vissl_keys

__all__ = [
    "AsyncSave",
    "CheckpointError",
    "export_hf",
    "import_vissl",
    "inspect",
    "is_dcp",
    "latest_checkpoint",
    "list_checkpoints",
    "load_sharded",
    "load_sliced",
    "map_vissl_keys",
    "read_dcp_manifest",
    "read_manifest",
    "read_sliced_manifest",
    "reslice",
    "save_sharded",
    "unit_of",
    "verify",
    "wait_for_saves",
]
