"""Line and bar plots of benchmark results (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lines(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path, *, xlabel: str,
               ylabel: str, title: str, errors: Mapping[str, Sequence[float]] | None = None,
               hlines: Mapping[str, float] | None = None, logx: bool = False) -> None:
    """One line per method (``name -> (x, y)``), optional error bars and reference lines."""
    plt = _pyplot()
    many = len(series) > 8
    fig, ax = plt.subplots(figsize=(10.5 if many else 7, 4.5))
    colors = plt.get_cmap("tab20").colors
    markers = "os^vDP*Xph<>"
    for i, (name, (xs, ys)) in enumerate(series.items()):
        style = {"marker": markers[i % len(markers)], "ms": 3, "color": colors[(2 * i) % 20 + (i // 10) % 2],
                 "label": name}
        err = (errors or {}).get(name)
        if err is not None:
            ax.errorbar(xs, ys, yerr=err, capsize=2, **style)
        else:
            ax.plot(xs, ys, **style)
    for name, y in (hlines or {}).items():
        ax.axhline(y, ls="--", lw=1, color="grey")
        ax.text(ax.get_xlim()[0], y, f" {name}", va="bottom", fontsize=7, color="grey")
    if logx:
        ax.set_xscale("log")
        ticks = sorted({float(x) for xs, _ in series.values() for x in xs})
        if 0 < len(ticks) <= 8:  # few x values (K): label them plainly
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if many:  # outside the axes, so that no curve is hidden
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(values: Mapping[str, float], path: Path, *, ylabel: str, title: str,
              errors: Mapping[str, float] | None = None, hline: float | None = None) -> None:
    """Horizontal bars, one per method (mean ± std)."""
    plt = _pyplot()
    names = list(values)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5))
    ax.barh(names, [values[n] for n in names], xerr=[(errors or {}).get(n, 0.0) for n in names], capsize=2)
    if hline is not None:
        ax.axvline(hline, ls="--", color="red", lw=1)
    lo = min(values.values()) if values else 0.0
    ax.set_xlim(max(0.0, lo - 0.1), 1.0)
    ax.invert_yaxis()
    ax.set_xlabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
