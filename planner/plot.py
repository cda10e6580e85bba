"""Memory over one training step, before and after checkpointing (the paper's Fig. 4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from fsdpkit import FsdpkitError

__all__ = ["plot_timelines"]


def plot_timelines(
    path: str | Path,
    series: Mapping[str, Sequence[int]],
    *,
    title: str,
    budget_bytes: int | None = None,
) -> None:
    """Write a PNG or SVG (by extension) of live bytes against progress through the step.

    ``series``: label → bytes at successive moments (events of the memory model, or every
    allocation and free of a measured step); each is spread over the x axis [0, 1].
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
    for label, ys in series.items():
        if not ys:
            continue
        xs = [i / max(len(ys) - 1, 1) for i in range(len(ys))]
        ax.step(xs, [y / 2**30 for y in ys], where="post", label=label, linewidth=1.4)
    if budget_bytes:
        ax.axhline(budget_bytes / 2**30, color="red", linestyle="--", linewidth=1, label="budget")
    ax.set_xlabel("progress through one training step (forward → backward → optimizer)")
    ax.set_ylabel("memory (GiB)")
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
