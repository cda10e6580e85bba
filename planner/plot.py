"""Memory over one training step, before and after checkpointing (the paper's Fig. 4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import accumulate
from pathlib import Path

from kitcore import FsdpkitError

__all__ = ["plot_timelines", "predicted_points"]


def predicted_points(timeline: Sequence[tuple[str, int, int]]) -> list[tuple[float, int]]:
    """A memory-model timeline as ``(FLOPs elapsed at the event's start, bytes)`` points, with
    a closing point so the last event has a width."""
    starts = [0, *accumulate(max(f, 1) for _, _, f in timeline)]
    points = [(float(x), b) for x, (_, b, _) in zip(starts, timeline, strict=False)]
    return [*points, (float(starts[-1]), timeline[-1][1])]


def plot_timelines(
    path: str | Path,
    series: Mapping[str, Sequence[tuple[float, int]]],
    *,
    title: str,
    budget_bytes: int | None = None,
) -> None:
    """Write a PNG or SVG (by extension) of live bytes against progress through the step.

    ``series``: label → ``(x, bytes)`` points, x in any time-like unit (seconds of a measured
    step, FLOPs of predicted events); each series is normalised to [0, 1].
    """
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise FsdpkitError(f"--plot {path}: use a .png or .svg file name")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FsdpkitError("--plot needs matplotlib: pip install 'fsdpkit[plot]'") from None
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120)
    for label, points in series.items():
        if not points:
            continue
        end = points[-1][0] or 1
        xs = [x / end for x, _ in points]
        ax.step(xs, [y / 2**20 for _, y in points], where="post", label=label, linewidth=1.3)
    if budget_bytes:
        ax.axhline(budget_bytes / 2**20, color="red", linestyle="--", linewidth=1, label="budget")
    ax.set_xlabel("progress through one step: forward → backward → optimizer (time, or FLOPs)")
    ax.set_ylabel("memory (MiB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise FsdpkitError(f"--plot {path}: cannot write: {e.strerror}") from None
    finally:
        plt.close(fig)
