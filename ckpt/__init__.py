"""ckpt: crash-safe sharded checkpoints for training, verification and inspection.

``save_sharded`` / ``load_sharded`` on every rank; ``latest_checkpoint`` for resuming;
``verify`` (completeness, sizes, per-tensor CRC-32) and ``inspect`` for tools. Metadata is
JSON and tensors are safetensors: nothing is unpickled. Streaming reslicing into per-unit
slices and loading slices on any world size are still to come.
"""

from ._format import CheckpointError
from .sharded import latest_checkpoint, list_checkpoints, load_sharded, save_sharded
from .verify import inspect, read_manifest, verify

__all__ = [
    "CheckpointError",
    "inspect",
    "latest_checkpoint",
    "list_checkpoints",
    "load_sharded",
    "read_manifest",
    "save_sharded",
    "verify",
]
