"""SwAV pretraining run: data → :func:`~seer_train.train.train_step` → sharded checkpoints.

Run directory ``out``::

    plan.json          the checkpoint plan the model was built with
    metrics.jsonl      one JSON object per step (rank 0)
    checkpoints/       sharded checkpoints (``ckpt.save_sharded``), the last ``keep_last``
    sliced/            per-unit slices of the final checkpoint (``ckpt.reslice``)

A run resumes by itself from the newest complete checkpoint in ``out/checkpoints``, at the
exact sample: the loader restarts at that step and each step's augmentation is seeded by
(seed, rank, step), so a resumed run computes bitwise what the uninterrupted one would have.
That is what makes ``torchrun --max-restarts N`` elastic: after a rank dies the agent
restarts the group and the run continues from the newest checkpoint, bitwise. Failures that
do not kill a process are turned into ones that do or into policy (docs/resilience.md): a
rank that makes no progress for ``collective_timeout_s`` stops the job naming it
(:class:`~seer_train.distributed.Watchdog`); a non-finite loss skips the step on every rank,
and ``max_bad_steps`` consecutive skips stop the run.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ckpt import latest_checkpoint, list_checkpoints, load_sharded, reslice
from ckpt.sharded import save_sharded, wait_for_saves
from fsdpkit import FsdpkitError
from planner import Plan
from planner.oracle import fsdp_step_tracker

from .data import (
    ImageFolder,
    MultiCropSpec,
    PhotometricAugment,
    PhotometricConfig,
    SyntheticImages,
    pretrain_loader,
)
from .distributed import Preemption, Watchdog, distributed
from .schedule import SEERSchedule
from .train import TrainConfig, build, check_plan, make_optimizer, solve_plan, train_step

__all__ = ["PretrainConfig", "PretrainResult", "open_dataset", "pretrain"]

# Settings that must not change when a run resumes (the LR schedule and the data order
# depend on them).
_RESUME_KEYS = ("model", "batch_size", "dtype", "steps", "seed", "data")


@dataclass(frozen=True, slots=True, kw_only=True)
class PretrainConfig:
    """A pretraining run.

    steps: iterations of the whole run (the LR schedule's length); stop_after: stop, with a
    checkpoint, after this many iterations (a later run resumes); save_every: iterations
    between checkpoints; data: ``synthetic`` or a folder of images (recursive, unlabelled);
    synthetic_images: size of the synthetic set; workers: loader processes per rank;
    photometric: the colour distortion of every crop (SEER's by default); max_bad_steps:
    consecutive skipped steps (non-finite loss) that stop the run; collective_timeout_s:
    seconds without progress on some rank before the job fails naming it (None: never);
    first_step_timeout_s: the same deadline for the run's first step (initialisation, first
    collectives), when longer;
    save_every_minutes: also checkpoint when this much time passed since the last save
    (rank 0's clock decides, every rank agrees); async_save: write checkpoints in the
    background (``save_sharded(blocking=False)``); plan: a plan saved by ``fsdpkit plan
    --save`` (checked against this run's setup) instead of solving one; a resumed run uses
    its own ``out/plan.json``.
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    data: str = "synthetic"
    synthetic_images: int = 4096
    steps: int = 100
    stop_after: int | None = None
    out: str = "runs/seer"
    save_every: int = 50
    keep_last: int = 2
    workers: int = 2
    seed: int = 0
    reslice: bool = True
    photometric: PhotometricConfig = field(default_factory=PhotometricConfig)
    max_bad_steps: int = 10
    collective_timeout_s: float | None = 300.0
    first_step_timeout_s: float = 600.0
    save_every_minutes: float | None = None
    async_save: bool = False
    plan: str | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.save_every < 1:
            raise FsdpkitError("--steps and --save-every must be >= 1")
        if self.max_bad_steps < 1:
            raise FsdpkitError(f"--max-bad-steps must be >= 1, got {self.max_bad_steps}")
        if self.collective_timeout_s is not None and not self.collective_timeout_s > 0:
            raise FsdpkitError(
                f"--collective-timeout must be > 0 seconds, got {self.collective_timeout_s}"
            )
        if not self.first_step_timeout_s > 0:
            raise FsdpkitError(
                f"--first-step-timeout must be > 0 seconds, got {self.first_step_timeout_s}"
            )
        if self.save_every_minutes is not None and not self.save_every_minutes > 0:
            raise FsdpkitError(f"--save-every-minutes must be > 0, got {self.save_every_minutes}")
        if self.stop_after is not None and self.stop_after < 1:
            raise FsdpkitError("--stop-after must be >= 1")

    def resume_key(self) -> dict[str, Any]:
        flat = {**asdict(self.train), **asdict(self)}
        return {k: flat[k] for k in _RESUME_KEYS}


@dataclass(frozen=True, slots=True)
class PretrainResult:
    """What a run did (rank-local figures are rank 0's).

    peak_memory_bytes: peak bytes of live tensors on this rank, the quantity the plan
    predicts (``planned_peak_bytes``): ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the
    peak of one tracked steady-state step (PyTorch's ``FSDPMemTracker``). peak_rss_bytes: the
    process's peak resident set (interpreter, libraries, loader buffers too: not comparable
    with the plan)."""

    world_size: int
    start_step: int
    end_step: int
    stopped: str  # "done", "stop_after" or "sigterm"
    losses: list[float]
    bad_steps: int  # steps skipped for a non-finite loss (this run)
    images_per_s: float
    peak_memory_bytes: int
    planned_peak_bytes: int
    peak_rss_bytes: int
    plan_segments: list[tuple[int, int, bool]]
    images_skipped: dict[str, int]
    checkpoint: str | None
    sliced: str | None


def open_dataset(data: str, synthetic_images: int, size: int):
    """``synthetic`` (procedural images, no files) or an image folder."""
    if data == "synthetic":
        return SyntheticImages(synthetic_images, size=size)
    return ImageFolder(data)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _tracked(run: Callable[[], Any], model, optimizer, crops) -> tuple[Any, int]:
    """``run()`` under PyTorch's ``FSDPMemTracker``: its result and the peak bytes of tensors
    on this rank while it ran (parameters, gradients, buffers, optimizer state and the crops
    from the start; replicated BatchNorm parameters, which FSDP does not manage, too).
    FSDP2 frees and re-creates un-sharded parameters by resizing one storage, which a tracker
    of storage creation (``planner.LiveMemory``) reads as still alive: on ``tiny`` it read
    1 MB (1.5%) above this one on the same step. Costs Python work per op: done for one step,
    not every step."""
    tracker = fsdp_step_tracker(model, optimizer, crops)  # LARC is the optimizer that steps
    with tracker:
        out = run()
    device = crops[0].device
    return out, int(tracker.get_tracker_snapshot("peak")[device]["Total"])


def _resume(ckpts: Path, model, optimizer, scaler, cfg: PretrainConfig) -> int:
    latest = latest_checkpoint(ckpts)
    if latest is None:
        return 0
    manifest = load_sharded(latest, model, optimizer)
    saved = manifest["extra"].get("run", {})
    for key, value in cfg.resume_key().items():
        if saved.get(key) != value:
            raise FsdpkitError(
                f"{latest}: saved with {key}={saved.get(key)!r}, this run has {value!r}; "
                "use the same settings or another --out"
            )
    if "scaler" in manifest["extra"]:
        scaler.load_state_dict(manifest["extra"]["scaler"])
    return manifest["step"]


def _the_plan(cfg: PretrainConfig, rank: int, world_size: int, resuming: bool) -> Plan:
    """The checkpoint plan every rank builds with: ``cfg.plan`` if given; when resuming, the
    run's own ``plan.json``; else rank 0 solves and broadcasts it (so ranks cannot disagree,
    and only one profiles). Checked against this run's setup (one-line error)."""
    own = Path(cfg.out) / "plan.json"
    path = cfg.plan or (str(own) if resuming and own.exists() else None)
    if path is not None:
        plan = Plan.load(path)
    else:
        box: list[Any] = [None]
        if rank == 0:
            try:
                box[0] = json.dumps(solve_plan(cfg.train, world_size).to_json())
            except FsdpkitError as e:  # every rank must leave the broadcast with the error
                box[0] = e
        if world_size > 1:
            dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], FsdpkitError):
            raise box[0]
        plan = Plan.from_json(json.loads(box[0]))
        path = "the plan rank 0 solved"
    check_plan(plan, cfg.train, world_size, origin=path)
    return plan


def pretrain(
    cfg: PretrainConfig, on_step: Callable[[dict[str, Any]], None] | None = None
) -> PretrainResult:
    """Run (or resume) SwAV pretraining on every rank of the job; returns rank-0 figures.

    ``on_step(metrics)`` is called on every rank after each step (rank 0 drives progress
    display); metrics are also appended to ``out/metrics.jsonl`` by rank 0.
    """
    tc = cfg.train
    # Bad data fails here, before any process group or model exists.
    dataset = open_dataset(cfg.data, cfg.synthetic_images, max(tc.preset.crop_sizes) * 3 // 2)
    with distributed() as ctx:
        out = Path(cfg.out)
        ckpts = out / "checkpoints"
        resuming = bool(list_checkpoints(ckpts)) and cfg.plan is None
        plan = _the_plan(cfg, ctx.rank, ctx.world_size, resuming)
        if ctx.rank == 0 and not (resuming and (out / "plan.json").exists()):
            # a resumed run built from its own plan.json (peers may still be reading it)
            out.mkdir(parents=True, exist_ok=True)
            plan.save(out / "plan.json")
        model, _ = build(tc, plan, ctx.device, seed=cfg.seed)
        optimizer = make_optimizer(model, tc)
        scaler = torch.amp.GradScaler(ctx.device.type, enabled=tc.dtype == "fp16")
        start = _resume(ckpts, model, optimizer, scaler, cfg)
        end = min(cfg.steps, cfg.stop_after or cfg.steps)
        schedule = SEERSchedule(
            batch_size=tc.batch_size * ctx.world_size, total_iters=cfg.steps,
            base_lr=tc.base_lr, warmup_fraction=tc.warmup_fraction,
        )  # fmt: skip
        spec = MultiCropSpec.from_sizes(tc.preset.crop_sizes)
        loader = pretrain_loader(
            dataset, spec, tc.batch_size, rank=ctx.rank, world_size=ctx.world_size,
            seed=cfg.seed, start_step=start, num_workers=cfg.workers,
        )  # fmt: skip
        augment = PhotometricAugment(cfg.photometric).to(ctx.device)
        preempt = Preemption()
        # A restarted group (torchrun) gets fresh heartbeat keys in the agent's store.
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "")
        watchdog = None
        if cfg.collective_timeout_s:
            first = cfg.first_step_timeout_s
            watchdog = Watchdog(cfg.collective_timeout_s, ctx.rank, ctx.world_size, restart, first)
        losses, skipped, rates = [], {}, []
        bad_steps = bad_run = 0
        # CPU has no allocator statistics: track the tensors of one steady-state step (the
        # second of this run, when momentum buffers exist), else of the only one
        tracked_step = min(start + 1, end - 1) if ctx.device.type != "cuda" else None
        tensor_peak = 0
        saved_at, stopped, step = start, "done", start
        save_due_s = cfg.save_every_minutes * 60 if cfg.save_every_minutes else float("inf")
        last_save = time.monotonic()
        metrics_file = open(out / "metrics.jsonl", "a") if ctx.rank == 0 else None  # noqa: SIM115
        try:
            for step in range(start, end):
                if watchdog:
                    watchdog.beat(step + 1)
                t0 = time.perf_counter()
                crops, info = next(loader)
                seed = (cfg.seed * 65_537 + ctx.rank) * 1_000_003 + step  # this step, this rank
                crops = augment([c.to(ctx.device, non_blocking=True) for c in crops], seed=seed)
                lr = schedule(step)
                # Flags every rank agrees on in the step's own all-reduce: stop (SIGTERM on
                # any rank), save now (rank 0's clock; time-based cadence).
                due = ctx.rank == 0 and time.monotonic() - last_save >= save_due_s
                votes = torch.tensor([float(preempt.flag), float(due)], device=ctx.device)

                def run(crops=crops, step=step, lr=lr, votes=votes) -> dict[str, Any]:
                    return train_step(model, optimizer, scaler, crops, iteration=step, lr=lr,
                                      cfg=tc, votes=votes)  # fmt: skip

                if step == tracked_step:
                    m, tensor_peak = _tracked(run, model, optimizer, crops)
                else:
                    m = run()
                if ctx.device.type == "cuda":
                    tensor_peak = torch.cuda.max_memory_allocated(ctx.device)
                dt = time.perf_counter() - t0
                skipped = info.skipped_total  # since this run started, by reason
                losses.append(m["loss"])
                bad_steps += m["skipped"]
                bad_run = bad_run + 1 if m["skipped"] else 0
                sigterm, save_now = m.pop("votes")
                rate = tc.batch_size * ctx.world_size / dt
                if step not in (start, tracked_step):  # warm-up and tracking are not speed
                    rates.append(rate)
                m |= {"step": step + 1, "lr": lr, "images_per_s": rate,
                      "step_s": dt, "tensor_peak_bytes": tensor_peak, "rss_bytes": _peak_rss(),
                      "images_skipped": sum(skipped.values()), "bad_steps": bad_steps}  # fmt: skip
                if metrics_file:
                    metrics_file.write(json.dumps(m) + "\n")
                    metrics_file.flush()
                if on_step:
                    on_step(m)
                if bad_run >= cfg.max_bad_steps:
                    raise FsdpkitError(
                        f"step {step + 1}: the loss was not finite on some rank for {bad_run} "
                        f"consecutive steps (--max-bad-steps {cfg.max_bad_steps}), all skipped; "
                        f"resume from {latest_checkpoint(ckpts) or 'the start'} with a lower --lr"
                    )
                if sigterm:
                    stopped = "sigterm"
                last = step + 1 == end or stopped == "sigterm"
                if (step + 1) % cfg.save_every == 0 or last or save_now:
                    if watchdog:
                        watchdog.beat(step + 1, "save")
                    extra = {"run": cfg.resume_key(), "scaler": scaler.state_dict()}
                    # the run's last checkpoint is written before returning
                    save_sharded(
                        ckpts / f"step_{step + 1:08d}", model, optimizer, step=step + 1,
                        extra=extra, keep_last=cfg.keep_last, units=list(plan.units),
                        blocking=not cfg.async_save or last, model_name=tc.model,
                    )  # fmt: skip
                    saved_at, last_save = step + 1, time.monotonic()
                if stopped == "sigterm":
                    break
        finally:
            if watchdog:
                watchdog.close()
            loader.close()  # stops the loader's worker processes now, not at collection
            preempt.close()
            if metrics_file:
                metrics_file.close()
        wait_for_saves()  # a run that returns has published everything it saved
        done = saved_at if start < end else start
        if stopped == "done" and done < cfg.steps:
            stopped = "stop_after"
        sliced = None
        last = latest_checkpoint(ckpts)
        if cfg.reslice and done == cfg.steps and last is not None:
            sliced = out / "sliced"
            if ctx.rank == 0 and not sliced.exists():
                reslice(last, sliced)
            dist.barrier()
        return PretrainResult(
            world_size=ctx.world_size,
            start_step=start,
            end_step=done,
            stopped=stopped,
            losses=losses,
            bad_steps=bad_steps,
            images_per_s=sum(rates) / len(rates) if rates else 0.0,
            peak_memory_bytes=tensor_peak,
            planned_peak_bytes=plan.peak_bytes,
            peak_rss_bytes=_peak_rss(),
            plan_segments=[tuple(s) for s in plan.segments],
            images_skipped=dict(skipped),
            checkpoint=str(last) if last else None,
            sliced=str(sliced) if sliced else None,
        )
