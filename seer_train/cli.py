"""The ``seer-train`` command: ``pretrain`` (under ``torchrun``) and ``linear-eval``.

Both are thin wrappers over :func:`seer_train.pretrain.pretrain` and
:func:`seer_train.linear_eval.linear_eval`. Only rank 0 prints. Bad input is one line
``seer-train: error: …`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict

from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fsdpkit import FsdpkitError
from kitcore.console import run_command, stdout_console
from kitcore.units import format_bytes, parse_bytes

from .data import PHOTOMETRIC_PRESETS, DataError
from .loss import SwAVLossConfig
from .models import PRESETS
from .train import TrainConfig

__all__ = ["build_parser", "main"]


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _train_config(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        model=a.model,
        batch_size=a.batch_size,
        dtype=a.dtype,
        memory_budget=parse_bytes(a.memory_budget) if a.memory_budget else None,
        granularity=a.granularity,
        prefetch=a.prefetch,
        sync_bn_group=a.sync_bn_group,
        base_lr=a.lr,
        warmup_fraction=a.warmup,
        freeze_prototypes_iters=a.freeze_prototypes,
        trust_coefficient=a.trust,
        loss=SwAVLossConfig(epsilon=a.epsilon, temperature=a.temperature),
    )


def _step_stats(m: dict) -> str:
    mem = format_bytes(m["tensor_peak_bytes"]) if m["tensor_peak_bytes"] else "-"
    return (f"loss {m['loss']:.4f}  lr {m['lr']:.4g}  {m['images_per_s']:.1f} img/s  "
            f"tensors {mem}  scale {m['loss_scale']:g}")  # fmt: skip


def _log_lines(total: int, every: int):
    """An ``on_step`` that prints one plain line every ``every`` steps (and the last): step,
    loss, images/s, ETA from the mean step time so far."""
    seen: list[float] = []

    def on_step(m: dict) -> None:
        seen.append(m["step_s"])
        step = m["step"]
        if step % every and step != total:
            return
        mean = sum(seen[1:] or seen) / len(seen[1:] or seen)  # the first step warms up
        eta = round(mean * (total - step))
        print(f"step {step}/{total}  {_step_stats(m)}  ETA {eta // 60}m{eta % 60:02d}s",
              flush=True)  # fmt: skip

    return on_step


def _tensor_source() -> str:
    import torch

    if torch.cuda.is_available():
        return "torch.cuda.max_memory_allocated"
    return "FSDPMemTracker over one step"


def _pretrain(a: argparse.Namespace) -> int:
    from .pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(
        train=_train_config(a), data=a.data, synthetic_images=a.synthetic_images,
        steps=a.steps, stop_after=a.stop_after, out=a.out, save_every=a.save_every,
        keep_last=a.keep_last, workers=a.workers, seed=a.seed, reslice=not a.no_reslice,
        photometric=PHOTOMETRIC_PRESETS[a.photometric], max_bad_steps=a.max_bad_steps,
        collective_timeout_s=a.collective_timeout or None,
        first_step_timeout_s=a.first_step_timeout,
        save_every_minutes=a.save_every_minutes, async_save=a.async_save, plan=a.plan,
    )  # fmt: skip
    if a.log_every < 0:
        raise FsdpkitError(f"--log-every must be >= 0 (0: automatic), got {a.log_every}")
    show = _is_rank0() and not a.json
    console = stdout_console()
    total = cfg.stop_after or cfg.steps
    if show and not console.is_terminal:  # a log, CI, `| tee`: rich's bar would print nothing
        on_step = _log_lines(total, a.log_every or max(1, min(50, total // 20)))
        result = pretrain(cfg, on_step=on_step)
    else:
        columns = [TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[stats]}"), TimeRemainingColumn()]  # fmt: skip
        with Progress(*columns, console=console, disable=not show) as progress:
            task = progress.add_task("steps", total=total, stats="")

            def on_bar(m: dict) -> None:
                progress.update(task, completed=m["step"], stats=_step_stats(m))

            result = pretrain(cfg, on_step=on_bar)
    if not _is_rank0():
        return 0
    if a.json:
        print(json.dumps(asdict(result)))
        return 0
    t = Table(title=f"SwAV pretraining of {a.model}", box=box.SIMPLE_HEAD, show_header=False)
    first = f"{result.losses[0]:.4f}" if result.losses else "-"
    last = f"{result.losses[-1]:.4f}" if result.losses else "-"
    rows = [
        ("ranks", str(result.world_size)),
        ("steps", f"{result.start_step} → {result.end_step} ({result.stopped})"),
        ("loss", f"{first} → {last}"),
        ("images/s (all ranks)", f"{result.images_per_s:.1f}"),
        ("peak tensor memory, rank 0", f"{format_bytes(result.peak_memory_bytes)} "
                                       f"(plan: {format_bytes(result.planned_peak_bytes)}; "
                                       f"{_tensor_source()})"),
        ("peak RSS, rank 0", f"{format_bytes(result.peak_rss_bytes)} "
                             "(whole process; the plan does not predict it)"),
        ("checkpointed segments", str([s[:2] for s in result.plan_segments if s[2]])),
        ("images skipped", str(result.images_skipped or 0)),
        ("steps skipped (non-finite loss)", str(result.bad_steps)),
        ("checkpoint", str(result.checkpoint)),
        ("sliced", str(result.sliced)),
    ]  # fmt: skip
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    return 0


def _linear_eval(a: argparse.Namespace) -> int:
    from .linear_eval import LinearEvalConfig, linear_eval

    cfg = LinearEvalConfig(
        ckpt=a.ckpt, model=a.model, data=a.data, train_images=a.train_images,
        val_images=a.val_images, seed=a.seed, baseline=not a.no_baseline,
    )  # fmt: skip
    result = linear_eval(cfg)
    if not _is_rank0():
        return 0
    if a.json:
        print(json.dumps(asdict(result)))
        return 0
    t = Table(title=f"Linear evaluation of {result.model} ({result.classes} classes, "
                    f"{result.train_images} train / {result.val_images} val images)",
              box=box.SIMPLE_HEAD)  # fmt: skip
    t.add_column("trunk")
    t.add_column("top-1 %", justify="right")
    t.add_row(f"pretrained ({a.ckpt})", f"{100 * result.top1:.1f}")
    if result.random_top1 is not None:
        t.add_row("random init (same architecture)", f"{100 * result.random_top1:.1f}")
    stdout_console().print(t)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seer-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="SwAV pretraining (run under torchrun for many ranks)")
    p.add_argument("--model", default="tiny", choices=list(PRESETS))
    p.add_argument("--data", default="synthetic", help="'synthetic' or a folder of images")
    p.add_argument("--synthetic-images", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=32, help="images per rank per step")
    p.add_argument("--steps", type=int, default=100, help="iterations of the whole run")
    p.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after N iterations")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--memory-budget", help="per-rank budget the plan must fit, e.g. 40GiB")
    p.add_argument("--granularity", choices=["op", "unit"], default="op",
                   help="op: per unit keep / selective / checkpointed segment; unit: whole "
                   "units only (fewer Python-level operators on CPU)")  # fmt: skip
    p.add_argument("--plan", metavar="FILE",
                   help="train with a plan saved by `fsdpkit plan --save FILE` (checked "
                        "against this run: model, batch, dtype, world size, policy)")  # fmt: skip
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--sync-bn-group", type=int, help="ranks per SyncBatchNorm group")
    p.add_argument("--lr", type=float, default=0.3, help="peak LR per 256 images")
    p.add_argument("--warmup", type=float, default=0.043648, help="warmup fraction of the run")
    p.add_argument("--trust", type=float, default=0.001, help="LARC trust coefficient")
    p.add_argument("--freeze-prototypes", type=int, default=313, help="iterations")
    p.add_argument(
        "--photometric",
        default="seer",
        choices=list(PHOTOMETRIC_PRESETS),
        help="colour distortion of the crops: SEER's, milder, or blur only",
    )
    p.add_argument("--epsilon", type=float, default=0.03)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--out", default="runs/seer", help="run directory (resumed if it exists)")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="loader processes per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--save-every-minutes",
        type=float,
        help="also checkpoint when this many minutes passed since the last save",
    )
    p.add_argument(
        "--async-save",
        action="store_true",
        help="write checkpoints in the background (training resumes once staged)",
    )
    p.add_argument(
        "--max-bad-steps",
        type=int,
        default=10,
        help="stop after this many consecutive steps skipped for a non-finite loss",
    )
    p.add_argument(
        "--collective-timeout",
        type=float,
        default=300.0,
        help="seconds a rank may make no progress before the job fails naming it (0: wait forever)",
    )
    p.add_argument(
        "--first-step-timeout",
        type=float,
        default=600.0,
        help="the same deadline for the run's first step (start-up, first collectives), "
        "when longer than --collective-timeout",
    )
    p.add_argument("--no-reslice", action="store_true", help="skip slicing the last checkpoint")
    p.add_argument("--log-every", type=int, default=0,
                   help="steps between progress lines when stdout is not a terminal "
                        "(default: about 20 lines per run)")  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("linear-eval", help="linear classifier on frozen trunk features")
    p.add_argument("--ckpt", required=True, help="sliced checkpoint (pretrain's out/sliced)")
    p.add_argument("--model", help="preset (default: the one recorded in the checkpoint)")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' or a folder with one subfolder per class")  # fmt: skip
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="skip the random-trunk baseline")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_linear_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("seer-train", build_parser(), argv, errors=(DataError,))


if __name__ == "__main__":
    sys.exit(main())
