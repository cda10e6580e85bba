"""Per-rank bodies for the SwAV / seer_train tests (spawned ranks import them by name)."""

from collections import Counter

import torch
import torch.distributed as dist

from fsdpkit import CommCounter
from seer_train.loss import sinkhorn


def sinkhorn_on_my_rows(scores: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """Codes of this rank's rows of ``scores`` (A, sum(splits), K) by distributed Sinkhorn."""
    rank = dist.get_rank()
    lo = sum(splits[:rank])
    return sinkhorn(scores[:, lo : lo + splits[rank]])


def one_step_all_gathers(crop_sizes: tuple[int, ...]) -> int:
    """FSDP all-gathers in one SwAV train step of ``tiny`` with crops of ``crop_sizes``."""
    from seer_train.train import TrainConfig, build, make_optimizer, solve_plan, train_step

    cfg = TrainConfig(model="tiny", batch_size=2)
    model, _ = build(cfg, solve_plan(cfg, dist.get_world_size()), torch.device("cpu"))
    opt = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(dist.get_rank())
    crops = [torch.randn(2, 3, s, s) for s in crop_sizes]
    with CommCounter() as counter:
        train_step(model, opt, scaler, crops, iteration=0, lr=0.1, cfg=cfg)
    return Counter(op for _, op, _, _ in counter.calls)["_allgather_base_"]
