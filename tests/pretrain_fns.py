"""Per-rank bodies for the pretraining tests (spawned ranks import them by name)."""

import json
import os
from pathlib import Path

from seer_train.pretrain import PretrainConfig, pretrain
from seer_train.train import TrainConfig


def tiny_run(out: str, steps: int, stop_after: int | None = None, on_step=None, **kw) -> dict:
    """A few SwAV steps of ``tiny`` on synthetic images; returns the result as a dict."""
    cfg = PretrainConfig(
        train=TrainConfig(model="tiny", batch_size=4, **kw.pop("train", {})),
        data="synthetic", synthetic_images=64, steps=steps, stop_after=stop_after, out=out,
        save_every=kw.pop("save_every", 3), workers=kw.pop("workers", 0), **kw,
    )  # fmt: skip
    r = pretrain(cfg, on_step=on_step)
    return {"losses": r.losses, "start": r.start_step, "end": r.end_step, "stopped": r.stopped,
            "checkpoint": r.checkpoint, "sliced": r.sliced, "skipped": r.images_skipped,
            "peak": r.peak_memory_bytes, "planned": r.planned_peak_bytes,
            "bad_steps": r.bad_steps}  # fmt: skip


def evaluate(ckpt: str) -> dict:
    """Linear evaluation of ``ckpt`` on this job's ranks, on a small synthetic split."""
    from dataclasses import asdict

    from seer_train.linear_eval import LinearEvalConfig, linear_eval

    return asdict(linear_eval(LinearEvalConfig(ckpt=ckpt, train_images=120, val_images=60)))


def learn_and_evaluate(out: str, steps: int) -> dict:
    """``make demo``'s recipe on one rank, shortened: SwAV, then the linear probe (both trunks)."""
    from dataclasses import asdict

    from seer_train.data import PHOTOMETRIC_PRESETS
    from seer_train.linear_eval import LinearEvalConfig, linear_eval

    train = TrainConfig(model="tiny", batch_size=64, base_lr=0.6, trust_coefficient=0.01,
                        freeze_prototypes_iters=10)  # fmt: skip
    cfg = PretrainConfig(train=train, data="synthetic", steps=steps, out=out, save_every=steps,
                         workers=0, photometric=PHOTOMETRIC_PRESETS["blur"])  # fmt: skip
    pretrain(cfg)
    probe = LinearEvalConfig(ckpt=f"{out}/sliced", train_images=1000, val_images=500)
    return asdict(linear_eval(probe))


def poison_crops(rank: int, steps: set[int]) -> None:
    """From now on, this process's augmentation returns NaN crops on ``rank`` at the 0-based
    ``steps`` (read back from the step seed: (seed·65537 + rank)·1000003 + step)."""
    import torch

    from seer_train import pretrain as module

    class Poisoned(module.PhotometricAugment):
        def forward(self, crops, seed=None):
            out = super().forward(crops, seed=seed)
            me = int(os.environ.get("RANK", "0"))
            if me == rank and seed is not None and seed % 1_000_003 in steps:
                out[0] = torch.full_like(out[0], float("nan"))
            return out

    module.PhotometricAugment = Poisoned


def nan_run(out: str, steps: int, bad_rank: int, bad_steps: list[int], **kw) -> dict:
    """``tiny_run`` with NaN crops on ``bad_rank`` at the 0-based ``bad_steps``."""
    poison_crops(bad_rank, set(bad_steps))
    r = tiny_run(out, steps, **kw)
    lines = Path(out, "metrics.jsonl").read_text().splitlines() if os.environ["RANK"] == "0" else []
    return r | {"metrics": [json.loads(x) for x in lines]}
