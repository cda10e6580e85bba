"""Hugging Face ``transformers`` vision models as plain ``nn.Module`` factories, for planning
models no one here wrote without a ModelSpec (random weights from the library's default
configs: nothing is downloaded)::

    fsdpkit plan --model examples.hf_vision:convnext_tiny --input 3x224x224 --batch 8
    fsdpkit plan --model examples.hf_vision:vit_base --input 3x224x224 --batch 8

The planner builds them on the meta device (no memory), finds the unit chain (the repeated
blocks in execution order plus what runs before them) and uses the mean of the logits as the
loss (see ``fsdpkit plan --help``).
"""

from __future__ import annotations

from torch import nn

__all__ = ["convnext_tiny", "vit_base"]


def convnext_tiny(num_labels: int = 1000) -> nn.Module:
    """ConvNeXt-T (28.6 M parameters): depths 3/3/9/3, widths 96/192/384/768."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    return ConvNextForImageClassification(ConvNextConfig(num_labels=num_labels))


def vit_base(num_labels: int = 1000) -> nn.Module:
    """ViT-B/16 (86.6 M parameters): 12 layers, width 768, 12 heads, 224 px."""
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(num_labels=num_labels))
