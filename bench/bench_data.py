"""Data pipeline throughput: prints a table and writes bench/results/data.json.

One *image* is its full multi-crop set (``tiny`` preset: 2 × 64 px + 4 × 32 px). Rows:

- ``loader``: :func:`seer_train.data.pretrain_loader` images/s (decode + 6 random resized crops
  + flips + collate, uint8 out), on :class:`SyntheticImages` (96 px, generated on the fly) and
  on an :class:`ImageFolder` of 256 × 256 JPEGs written to a temp dir, with 0, 1 and 2 workers;
  worker start-up is excluded (one batch is taken first), the median of ``--repeats`` is kept.
  The consumer does nothing here, so 0 workers uses the main process fully; in training the
  main process is busy and only workers overlap loading with the step;
- ``augment``: :class:`PhotometricAugment` (kornia) on this CPU, images/s for one batch of
  every crop (on a GPU this stage is a few kernels per batch).

    python bench/bench_data.py [--batch-size 32] [--batches 16] [--jpegs 512]

:func:`measure` returns the rows, for reuse (e.g. against the training step's time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _report import report
from rich.table import Table

from seer_train.data import (
    ImageFolder,
    MultiCropSpec,
    PhotometricAugment,
    SyntheticImages,
    pretrain_loader,
)
from seer_train.models import PRESETS

SPEC = MultiCropSpec.from_sizes(PRESETS["tiny"].crop_sizes)


def _write_jpegs(folder: Path, count: int, size: int = 256) -> None:
    """``count`` textured JPEGs (quality 90), sized like small web photos."""
    ds = SyntheticImages(count, size=size, seed=1)
    for i in range(count):
        sub = folder / f"{i // 100:03d}"  # nested, as ImageFolder is recursive
        sub.mkdir(exist_ok=True)
        ds[i].save(sub / f"{i:05d}.jpg", quality=90)


def loader_images_per_s(
    dataset, spec: MultiCropSpec, batch_size: int, num_workers: int, batches: int
) -> float:
    """Steady-state images/s of ``pretrain_loader`` (first batch, with worker start, untimed)."""
    it = pretrain_loader(dataset, spec, batch_size, num_workers=num_workers)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed_s = time.perf_counter() - t0
    it.close()
    return batches * batch_size / elapsed_s


def augment_images_per_s(spec: MultiCropSpec, batch_size: int, repeats: int) -> float:
    """images/s of PhotometricAugment on CPU over a whole multi-crop batch."""
    aug = PhotometricAugment()
    crops = [torch.randint(0, 256, (batch_size, 3, s, s), dtype=torch.uint8) for s in spec.sizes]
    aug(crops, seed=0)  # first call builds kornia's blur kernels
    times_s = []
    for r in range(repeats):
        t0 = time.perf_counter()
        aug(crops, seed=r)
        times_s.append(time.perf_counter() - t0)
    return batch_size / statistics.median(times_s)


def measure(
    batch_size: int = 32, batches: int = 16, jpegs: int = 512, repeats: int = 3
) -> list[dict]:
    """All rows: {stage, data, workers, images_per_s, ms_per_image, batch_size, crops}."""
    crops = "+".join(f"{SPEC.sizes.count(s)}×{s}" for s in dict.fromkeys(SPEC.sizes))
    rows = []

    def row(stage: str, data: str, workers, images_per_s: float) -> None:
        rows.append(
            {
                "stage": stage,
                "data": data,
                "workers": workers,
                "images_per_s": images_per_s,
                "ms_per_image": 1e3 / images_per_s,
                "batch_size": batch_size,
                "crops": crops,
            }
        )

    with tempfile.TemporaryDirectory() as tmp:
        _write_jpegs(Path(tmp), jpegs)
        datasets = {
            "synthetic 96 px": SyntheticImages(4096),
            f"{jpegs} JPEGs 256 px": ImageFolder(tmp),
        }
        for name, ds in datasets.items():
            for workers in (0, 1, 2):
                runs = [
                    loader_images_per_s(ds, SPEC, batch_size, workers, batches)
                    for _ in range(repeats)
                ]
                row("loader", name, workers, statistics.median(runs))
    row("augment", "kornia, CPU", "-", augment_images_per_s(SPEC, batch_size, 2 * repeats))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=16, help="timed batches per run")
    parser.add_argument("--jpegs", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/data.json"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = measure(args.batch_size, args.batches, args.jpegs, args.repeats)
    table = Table(
        title=f"Data pipeline, tiny crops ({rows[0]['crops']}), batch {args.batch_size}, "
        f"median of {args.repeats}; one image = its full crop set"
    )
    for col in ("stage", "data", "workers", "images/s", "ms / image"):
        table.add_column(col, justify="left" if col in ("stage", "data") else "right")
    for r in rows:
        table.add_row(
            r["stage"],
            r["data"],
            str(r["workers"]),
            f"{r['images_per_s']:,.0f}",
            f"{r['ms_per_image']:.2f}",
        )
    # The machine may be shared: the load average says how much to trust the figures.
    meta = {
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "load_avg_1min": os.getloadavg()[0],
    }
    report(table, args.out, {"spec": "tiny", **meta, "rows": rows})


if __name__ == "__main__":
    main()
