"""Reliability diagrams (calibration plots) for reports, with matplotlib's file backend.

One panel: for each site (or model), observed event rate against mean predicted risk per risk
bin (:class:`~fedmeta.common.clinical.calibration.ReliabilityCurve`), marker area proportional
to the bin's patient count, the diagonal of perfect calibration, and the number of patients
and events in the legend.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fedmeta.common.clinical.calibration import ReliabilityCurve


def reliability_diagram(curves: Mapping[str, ReliabilityCurve], path: str | Path, *,
                        title: str = "Calibration") -> Path:
    """Draw ``curves`` (label -> curve) into a PNG at ``path``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.0))
    ax.plot([0, 1], [0, 1], color="#999999", lw=1, ls="--", label="perfect calibration")
    for label, c in curves.items():
        keep = c.count > 0
        n, events = int(c.count.sum()), int(round(float(c.event_sum.sum())))
        line, = ax.plot(c.mean_risk[keep], c.observed[keep], "-", lw=1.2,
                        label=f"{label} (n = {n}, {events} events)")
        ax.scatter(c.mean_risk[keep], c.observed[keep], s=12 + 120 * c.count[keep] / max(n, 1),
                   color=line.get_color(), alpha=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted risk (bin)")
    ax.set_ylabel("observed event rate (bin)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
