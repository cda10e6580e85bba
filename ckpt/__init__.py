"""ckpt: crash-safe sharded checkpoints for training, verification and inspection.

``save_sharded`` / ``load_sharded`` on every rank; ``latest_checkpoint`` for resuming;
``verify`` (completeness, sizes, per-tensor CRC-32) and ``inspect`` for tools. Metadata is
JSON and tensors are safetensors: nothing is unpickled. ``reslice`` streams a sharded
checkpoint into per-unit slices; ``load_sliced`` loads them on any world size.
"""

from ._format import CheckpointError
from .sharded import latest_checkpoint, list_checkpoints, load_sharded, save_sharded
from .sliced import load_sliced, reslice, unit_of
from .verify import inspect, read_manifest, read_sliced_manifest, verify

__all__ = [
    "CheckpointError",
    "inspect",
    "latest_checkpoint",
    "list_checkpoints",
    "load_sharded",
    "load_sliced",
    "read_manifest",
    "read_sliced_manifest",
    "reslice",
    "save_sharded",
    "unit_of",
    "verify",
]
