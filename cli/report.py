"""``fedmeta report RUN_DIR``: learning curves and before/after bars as PNG, and a Markdown report.

Reads only the run folder (``summary.json``, ``rounds.jsonl``); writes ``curves.png`` (query loss
after adaptation per round, per site and overall), ``adaptation.png`` (each site's test accuracy
and AUROC before and after adaptation) and ``report.md`` into the same folder (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from fedmeta.common.errors import FedmetaError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="plot a run's learning curves and adaptation results")
    p.add_argument("run_dir", type=Path, help="a run folder written by fedmeta simulate / run")
    p.add_argument("--out", type=Path, default=None, help="where to write (default: RUN_DIR)")
    p.set_defaults(func=_run)


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    summary_path, rounds_path = run_dir / "summary.json", run_dir / "rounds.jsonl"
    for path in (summary_path, rounds_path):
        if not path.is_file():
            raise FedmetaError(f"{run_dir}: no {path.name}; is this a finished fedmeta run folder?")
    try:
        summary = json.loads(summary_path.read_text())
        rounds = [json.loads(line) for line in rounds_path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise FedmetaError(f"{run_dir}: a run file is not valid JSON: {e}") from e
    return summary, rounds


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) else math.nan


def write_report(run_dir: Path, out_dir: Path) -> list[Path]:
    """Write the two PNGs and ``report.md``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    summary, rounds = read_run(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sites = sorted(summary["sites"])

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["round"] for r in rounds]
    for site in sorted({s for r in rounds for s in r.get("site_metrics", {})}):
        ys = [_num(r.get("site_metrics", {}).get(site, {}).get("query_loss_after")) for r in rounds]
        ax.plot(xs, ys, lw=1, alpha=0.6, label=site if len(sites) <= 12 else None)
    ax.plot(xs, [_num(r.get("query_loss_after")) for r in rounds], "k-", lw=2.5, label="all sites")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("query loss after inner adaptation")
    ax.set_title(f"{summary['algorithm']}: learning curves")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    curves = out_dir / "curves.png"
    fig.savefig(curves, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(max(7, 1.1 * len(sites) + 3), 4))
    width = 0.38
    for ax, metric in zip(axes, ("accuracy", "auroc"), strict=True):
        pos = range(len(sites))
        before = [_num(summary["sites"][s]["before"][metric]) for s in sites]
        after = [_num(summary["sites"][s]["after"][metric]) for s in sites]
        ax.bar([p - width / 2 for p in pos], before, width, label="before adaptation", color="#9aa5b1")
        ax.bar([p + width / 2 for p in pos], after, width, label="after adaptation", color="#2a6f97")
        ax.set_xticks(list(pos), sites, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"test {metric}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    bars = out_dir / "adaptation.png"
    fig.savefig(bars, dpi=120)
    plt.close(fig)

    def fmt(v: Any) -> str:
        x = _num(v)
        return "n/a" if math.isnan(x) else f"{x:.3f}"

    lines = [
        f"# fedmeta run: {summary['algorithm']}, {summary['rounds']} rounds",
        "",
        f"- data: `{summary['config']['data']['source']}`, {len(sites)} sites; seed {summary.get('seed', '?')}",
        f"- wall time: {summary['wall_s']:.1f} s; bytes up {summary['comm']['bytes_up']:,}, "
        f"down {summary['comm']['bytes_down']:,}",
        "",
        "| site | n train | n test | accuracy before | after | AUROC before | after | loss before | after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sites:
        d = summary["sites"][s]
        lines.append(
            f"| {s} | {d['n_train']} | {d['n_test']} | {fmt(d['before']['accuracy'])} | {fmt(d['after']['accuracy'])} "
            f"| {fmt(d['before']['auroc'])} | {fmt(d['after']['auroc'])} | {fmt(d['before']['loss'])} | {fmt(d['after']['loss'])} |"
        )
    m = summary["mean"]
    lines.append(
        f"| **mean (sites)** | | | {fmt(m['before']['accuracy'])} | {fmt(m['after']['accuracy'])} | "
        f"{fmt(m['before']['auroc'])} | {fmt(m['after']['auroc'])} | {fmt(m['before']['loss'])} | {fmt(m['after']['loss'])} |"
    )
    if summary.get("holdout"):
        lines += ["", "Held out of meta-training (new hospitals, adapted locally):", "",
                  "| site | n train | n test | accuracy before | after | AUROC before | after |", "|---|---|---|---|---|---|---|"]
        for s, d in summary["holdout"]["sites"].items():
            lines.append(f"| {s} | {d['n_train']} | {d['n_test']} | {fmt(d['before']['accuracy'])} | "
                         f"{fmt(d['after']['accuracy'])} | {fmt(d['before']['auroc'])} | {fmt(d['after']['auroc'])} |")
    rejected = sum(len(r.get("rejected", {})) for r in rounds)
    lines += ["", f"Rejected replies over the run: {rejected}.", "", "![learning curves](curves.png)", "",
              "![before/after adaptation](adaptation.png)", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return [curves, bars, report]


def _run(args: argparse.Namespace) -> int:
    for path in write_report(args.run_dir, args.out or args.run_dir):
        print(f"wrote {path}")
    return 0
