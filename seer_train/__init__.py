"""seer_train: SwAV pretraining of RegNetY (SEER), composed from fsdpkit, planner and ckpt.

The public names below load on first use, so that ``fsdpkit`` discovering the presets
(``seer_train.models``) does not import the training stack (kornia, the data pipeline)::

    from seer_train import PretrainConfig, TrainConfig, pretrain
    result = pretrain(PretrainConfig(train=TrainConfig(model="tiny"), steps=100))
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LinearEvalConfig": "linear_eval",
    "LinearEvalResult": "linear_eval",
    "linear_eval": "linear_eval",
    "PretrainConfig": "pretrain",
    "PretrainResult": "pretrain",
    "pretrain": "pretrain",
    "SEERSchedule": "schedule",
    "SwAVLossConfig": "loss",
    "sinkhorn": "loss",
    "swav_loss": "loss",
    "TrainConfig": "train",
    "build": "train",
    "make_optimizer": "train",
    "solve_plan": "train",
    "train_step": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'seer_train' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
