"""ckpt: crash-safe sharded checkpoints, streaming shard → slice conversion, slice loading.

Scope (issue 7). Not yet implemented: this package currently exports nothing.
"""

__all__: list[str] = []
