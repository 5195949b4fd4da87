"""accuracy.png: held-out accuracy per base model version (matplotlib, imported only when plotting).

The x axis is the model version a number was measured on: a closed round that produced version v
trained from version v-1, so its "global" accuracy sits at v-1 and the final global model at the
last version. Every point is at a version that exists.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Curve:
    """One line of the plot: (version, accuracy in [0, 1]) points."""

    label: str
    points: Sequence[tuple[int, float]]
    style: str = "o-"


def plot_accuracy(path: Path, curves: Sequence[Curve], levels: Mapping[str, float] | None = None,
                  title: str = "held-out accuracy") -> bool:
    """Write the plot; `levels` are horizontal reference lines (e.g. local-only). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no %s (pip install 'fedpers[sim]')", path.name)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, curve in enumerate(c for c in curves if c.points):
        xs, ys = zip(*sorted(curve.points), strict=True)
        ax.plot(xs, [100 * y for y in ys], curve.style, label=curve.label, color=f"C{i}")
    for j, (label, value) in enumerate((levels or {}).items()):
        ax.axhline(100 * value, color="grey", ls=("--", ":", "-.")[j % 3], label=label)
    ax.set_xlabel("base model version")
    ax.set_ylabel("held-out accuracy (%)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True
