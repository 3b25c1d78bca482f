"""One visual grammar for every figure of the report.

- colour = base optimizer (DPO blue, KTO orange, ... in the paper's order); several arms of one
  optimizer and kind (e.g. GPO-DPO with mc and with bisect) get shades of that colour, dark to light;
- line style and marker = GPO (solid, circles) or baseline (dashed, squares);
- arms that coincide stay visible: earlier arms are drawn wider and lighter underneath later ones,
  and round-indexed curves are dodged sideways by a fraction of a round;
- one legend per figure, outside the axes on the right, in table order; constrained layout (no
  tight_layout warnings, the legend never covers a panel).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from matplotlib.colors import to_rgb

from gpo_exp.report.types import ORDER, Arm

GPO_LINE, BASE_LINE = "-", "--"
GPO_MARKER, BASE_MARKER = "o", "s"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


@dataclass(frozen=True)
class ArmStyle:
    color: Any
    linestyle: str
    marker: str
    linewidth: float
    alpha: float
    zorder: float
    dodge: float  # sideways offset for round-indexed x values, in rounds

    def line(self, markers: bool = True) -> dict[str, Any]:
        """Keyword arguments for Axes.plot/step."""
        kw = dict(color=self.color, linestyle=self.linestyle, linewidth=self.linewidth, alpha=self.alpha,
                  zorder=self.zorder)
        if markers:
            kw.update(marker=self.marker, markersize=5, markeredgecolor="white", markeredgewidth=0.6)
        return kw


def _shade(color: str, i: int, n: int) -> tuple[float, float, float]:
    """The i-th of n shades of `color`, spread evenly from darker (i = 0) to lighter (i = n - 1)."""
    r, g, b = to_rgb(color)
    if n <= 1:
        return (r, g, b)
    t = 0.75 * (i / (n - 1) - 0.5)  # -0.375 .. +0.375
    if t < 0:
        return (r * (1 + t), g * (1 + t), b * (1 + t))
    return (r + (1 - r) * t, g + (1 - g) * t, b + (1 - b) * t)


def styles(arms: Sequence[Arm]) -> dict[str, ArmStyle]:
    """Arm label -> its style; the same arms get the same styles in every figure."""
    bases = sorted({a.base for a in arms}, key=lambda b: (ORDER.index(b) if b in ORDER else len(ORDER), b))
    out: dict[str, ArmStyle] = {}
    n = len(arms)
    for k, arm in enumerate(arms):
        kin = [a.label for a in arms if a.base == arm.base and a.gpo == arm.gpo]
        j = kin.index(arm.label)
        color = _shade(PALETTE[bases.index(arm.base) % len(PALETTE)], j, len(kin))
        out[arm.label] = ArmStyle(
            color=color,
            linestyle=GPO_LINE if arm.gpo else BASE_LINE,
            marker=GPO_MARKER if arm.gpo else BASE_MARKER,
            linewidth=1.4 + 1.6 * (n - 1 - k) / max(n - 1, 1),  # first arm widest: a later identical one shows on top
            alpha=0.9,
            zorder=2 + k,
            dodge=0.0 if n == 1 else 0.24 * (k / (n - 1) - 0.5),
        )
    return out


def legend_outside(fig: Any, handles: Sequence[Any], labels: Sequence[str], title: str | None = None) -> None:
    """One legend for the whole figure, right of the axes (the figure uses constrained layout)."""
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, title=title, title_fontsize=8,
                   frameon=False)


def figure(ncols: int = 1, width: float = 6.0, height: float = 4.0, n_labels: int = 0, longest_label: int = 0) -> tuple[Any, Any]:
    """A figure with constrained layout, widened so an outside legend of `n_labels` labels fits."""
    import matplotlib.pyplot as plt

    legend_w = 0.0 if not n_labels else min(0.065 * max(longest_label, 10) + 0.6, 6.0)
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols + legend_w, max(height, 0.22 * n_labels + 1.2)),
                             layout="constrained", squeeze=False)
    return fig, list(axes[0])
