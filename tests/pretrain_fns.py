"""Per-rank bodies for the pretraining tests (spawned ranks import them by name)."""

from seer_train.pretrain import PretrainConfig, pretrain
from seer_train.train import TrainConfig


def tiny_run(out: str, steps: int, stop_after: int | None = None, **kw) -> dict:
    """A few SwAV steps of ``tiny`` on synthetic images; returns the result as a dict."""
    cfg = PretrainConfig(
        train=TrainConfig(model="tiny", batch_size=4, **kw.pop("train", {})),
        data="synthetic", synthetic_images=64, steps=steps, stop_after=stop_after, out=out,
        save_every=kw.pop("save_every", 3), workers=kw.pop("workers", 0), **kw,
    )  # fmt: skip
    r = pretrain(cfg)
    return {"losses": r.losses, "start": r.start_step, "end": r.end_step, "stopped": r.stopped,
            "checkpoint": r.checkpoint, "sliced": r.sliced, "skipped": r.images_skipped,
            "peak": r.peak_memory_bytes, "planned": r.planned_peak_bytes}  # fmt: skip


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
