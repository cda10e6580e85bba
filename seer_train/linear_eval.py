"""Linear evaluation: a linear classifier on frozen trunk features, next to a random trunk.

The trunk comes from a *sliced* checkpoint (``ckpt reslice``), loaded on any world size: on
one rank into a whole model, on several into an FSDP-sharded one where each rank reads only
its rows of each tensor (``ckpt.load_sliced``). Features are pooled trunk outputs
(N, w_trunk), extracted in eval mode after both trunks' BatchNorm statistics are re-estimated
on the training images (:func:`recalibrate_batchnorm`), and shared by all ranks;
the classifier is a multinomial logistic regression on standardised features trained
full-batch with L-BFGS (deterministic, no learning rate to tune). The baseline runs the same
protocol on a randomly initialised trunk of the same architecture, so the gap is what
pretraining learnt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ckpt import load_sliced, read_sliced_manifest
from fsdpkit import FsdpkitError, FSDPPolicy, get_model_spec, parallelize

from .data import LabelledImageFolder, SyntheticImages, eval_loader
from .distributed import distributed
from .models import PRESETS, init_weights

__all__ = [
    "LinearEvalConfig",
    "LinearEvalResult",
    "fit_linear",
    "linear_eval",
    "recalibrate_batchnorm",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class LinearEvalConfig:
    """ckpt: sliced checkpoint directory; model: preset (default: recorded in the checkpoint);
    data: ``synthetic`` (held-out procedural images with their latent classes) or a folder
    with one subfolder per class (``train/`` and ``val/`` subfolders if present, else a
    deterministic 80/20 split); train_images / val_images: synthetic split sizes."""

    ckpt: str
    model: str | None = None
    data: str = "synthetic"
    train_images: int = 2000
    val_images: int = 1000
    batch_size: int = 128
    l2: float = 1e-3
    seed: int = 0
    baseline: bool = True


@dataclass(frozen=True, slots=True)
class LinearEvalResult:
    model: str
    world_size: int
    classes: int
    train_images: int
    val_images: int
    feature_dim: int
    top1: float
    random_top1: float | None
    bytes_read: int


def _model_name(cfg: LinearEvalConfig) -> str:
    manifest = read_sliced_manifest(cfg.ckpt)
    # the typed field; checkpoints from before it existed kept the name among pretrain's extras
    recorded = manifest.get("model") or manifest.get("extra", {}).get("run", {}).get("model")
    name = cfg.model or recorded
    if name is None:
        raise FsdpkitError(f"{cfg.ckpt}: no model recorded in the checkpoint; pass --model")
    if name not in PRESETS:
        raise FsdpkitError(f"unknown SEER preset {name!r}; choose from {', '.join(PRESETS)}")
    return name


def _splits(cfg: LinearEvalConfig, size: int):
    if cfg.data == "synthetic":
        # Held out from pretraining: another seed draws other images of the same classes.
        seed = cfg.seed + 1_000
        return (SyntheticImages(cfg.train_images, size=size, seed=seed),
                SyntheticImages(cfg.val_images, size=size, seed=seed + 1))  # fmt: skip
    root = Path(cfg.data)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return LabelledImageFolder(root / "train"), LabelledImageFolder(root / "val")
    full = LabelledImageFolder(root)
    return _Split(full, lambda i: i % 5 != 4), _Split(full, lambda i: i % 5 == 4)


class _Split:
    """The images of a labelled dataset whose index passes ``keep`` (a fixed 80/20 split)."""

    def __init__(self, dataset, keep) -> None:
        self.dataset, self.classes = dataset, dataset.classes
        self.index = [i for i in range(len(dataset)) if keep(i)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        return self.dataset[self.index[i]]

    def label(self, i: int) -> int:
        return self.dataset.label(self.index[i])


@torch.no_grad()
def _features(model: nn.Module, dataset, size: int, batch_size: int, device) -> tuple:
    """(N, w) features and (N,) labels of ``dataset``: each rank extracts its share, then all
    ranks gather every share (N is small next to the training set)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model.eval()
    feats, labels = [], []
    for batch in eval_loader(dataset, size, batch_size, rank=rank, world_size=world):
        feats.append(model(batch.images.to(device), features_only=True).float().cpu())
        labels.append(batch.labels)
    mine = (torch.cat(feats), torch.cat(labels))
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def fit_linear(
    x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-3, iters: int = 200
) -> nn.Linear:
    """Multinomial logistic regression on (N, d) features ``x`` with labels ``y``, full-batch
    L-BFGS with an L2 penalty; features should be standardised."""
    clf = nn.Linear(x.shape[1], classes)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(x), y) + l2 * clf.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, dataset, size: int, batch_size: int, device) -> None:
    """Re-estimate every BatchNorm's running statistics on ``dataset`` (cumulative average
    over this rank's share, then averaged over ranks), weights untouched.

    Both trunks get the same BatchNorm treatment this way: the pretrained one's stored
    statistics describe augmented multi-crop batches, the random one's are the initial 0/1,
    and either would bias the comparison. The model's momenta and train/eval mode are left as
    they were."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta, was_training = [m.momentum for m in bns], model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    rank, world = dist.get_rank(), dist.get_world_size()
    for batch in eval_loader(dataset, size, batch_size, rank=rank, world_size=world):
        model(batch.images.to(device), features_only=True)
    if world > 1:
        for m in bns:
            for t in (m.running_mean, m.running_var):
                dist.all_reduce(t)
                t /= world
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)


def _accuracy(model, train, val, size, cfg, device, classes) -> tuple[float, int]:
    recalibrate_batchnorm(model, train, size, cfg.batch_size, device)
    xt, yt = _features(model, train, size, cfg.batch_size, device)
    xv, yv = _features(model, val, size, cfg.batch_size, device)
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-6)
    clf = fit_linear((xt - mean) / std, yt, classes, cfg.l2)
    with torch.no_grad():
        pred = clf((xv - mean) / std).argmax(1)
    return (pred == yv).float().mean().item(), xt.shape[1]


def _model(name: str, device, world: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    spec = get_model_spec(name)  # the one lookup: training and profiling build through it too
    if world == 1:
        return spec.build_model(device)
    model = spec.build_model("meta")
    # Sharded like training (no checkpointing: no backward here), BatchNorm left local.
    policy = FSDPPolicy(sync_bn_group_size=-1, batchnorm="units")
    parallelize(model, units=[m for _, m in spec.named_units(model)], policy=policy)
    model.to_empty(device=device)
    init_weights(model)
    return model


def linear_eval(cfg: LinearEvalConfig) -> LinearEvalResult:
    """Top-1 accuracy of a linear classifier on the checkpoint's frozen features, and (with
    ``cfg.baseline``) on a random trunk's; on every rank of the job."""
    name = _model_name(cfg)
    size = max(PRESETS[name].crop_sizes)
    train, val = _splits(cfg, size)
    classes = len(train.classes)
    with distributed() as ctx:
        model = _model(name, ctx.device, ctx.world_size, cfg.seed)
        manifest = load_sliced(cfg.ckpt, model)
        top1, dim = _accuracy(model, train, val, size, cfg, ctx.device, classes)
        random_top1 = None
        if cfg.baseline:
            baseline = _model(name, ctx.device, ctx.world_size, cfg.seed + 1)
            random_top1 = _accuracy(baseline, train, val, size, cfg, ctx.device, classes)[0]
        return LinearEvalResult(
            model=name, world_size=ctx.world_size, classes=classes, train_images=len(train),
            val_images=len(val), feature_dim=dim, top1=top1, random_top1=random_top1,
            bytes_read=manifest["bytes_read"],
        )  # fmt: skip
