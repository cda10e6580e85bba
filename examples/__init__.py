"""Runnable examples (``fsdpkit plan --model examples.hf_vision:convnext_tiny ...``)."""
