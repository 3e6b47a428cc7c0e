"""``fedmeta report RUN_DIR``: learning curves and before/after bars as PNG, and a Markdown report.

Reads only the run folder (``summary.json``, ``rounds.jsonl``); writes ``curves.png`` (query loss
after adaptation per round, per site and overall; sites sampled in some rounds only are drawn
with markers at the rounds they took part in), ``adaptation.png`` (each site's test accuracy and
AUROC before and after adaptation), ``reliability.png`` (each site's calibration after
adaptation, from the risk bins the sites released) and ``report.md`` (per-site clinical metrics
with 95 % intervals and n, every outcome of multi-outcome sites, the adaptation each site chose)
into the same folder (or ``--out``).
"""

from __future__ import annotations

import argparse
import importlib.util
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


def _figures(summary: dict[str, Any], rounds: list[dict[str, Any]], sites: list[str],
             out_dir: Path) -> list[Path]:
    """``curves.png`` and ``adaptation.png`` (matplotlib: the ``reports`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["round"] for r in rounds]
    for site in sorted({s for r in rounds for s in r.get("site_metrics", {})}):
        ys = [_num(r.get("site_metrics", {}).get(site, {}).get("query_loss_after")) for r in rounds]
        taken = sum(not math.isnan(y) for y in ys)
        partial = taken < len(rounds)
        label = (f"{site} (sampled in {taken}/{len(rounds)} rounds)" if partial else site) \
            if len(sites) <= 12 else None
        ax.plot(xs, ys, "o-" if partial else "-", ms=3, lw=1, alpha=0.6, label=label)
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
        before = [_num(summary["sites"][s]["before"].get(metric)) for s in sites]
        after = [_num(summary["sites"][s]["after"].get(metric)) for s in sites]
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
    return [curves, bars]


def write_report(run_dir: Path, out_dir: Path) -> list[Path]:
    """Write ``report.md`` and, with matplotlib installed (``pip install 'fedmeta[reports]'``),
    its figures; returns their paths."""
    summary, rounds = read_run(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sites = sorted(summary["sites"])
    plots = importlib.util.find_spec("matplotlib") is not None
    written = _figures(summary, rounds, sites, out_dir) if plots else []

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
            f"| {s} | {d['n_train']} | {d['n_test']} | {fmt(d['before'].get('accuracy'))} | {fmt(d['after'].get('accuracy'))} "
            f"| {fmt(d['before'].get('auroc'))} | {fmt(d['after'].get('auroc'))} | {fmt(d['before'].get('loss'))} | {fmt(d['after'].get('loss'))} |"
        )
    m = summary["mean"]
    lines.append(
        f"| **mean (sites)** | | | {fmt(m['before'].get('accuracy'))} | {fmt(m['after'].get('accuracy'))} | "
        f"{fmt(m['before'].get('auroc'))} | {fmt(m['after'].get('auroc'))} | {fmt(m['before'].get('loss'))} | {fmt(m['after'].get('loss'))} |"
    )
    if summary.get("holdout"):
        lines += ["", "Held out of meta-training (new hospitals, adapted locally):", "",
                  "| site | n train | n test | accuracy before | after | AUROC before | after |", "|---|---|---|---|---|---|---|"]
        for s, d in summary["holdout"]["sites"].items():
            lines.append(f"| {s} | {d['n_train']} | {d['n_test']} | {fmt(d['before'].get('accuracy'))} | "
                         f"{fmt(d['after'].get('accuracy'))} | {fmt(d['before'].get('auroc'))} | {fmt(d['after'].get('auroc'))} |")
    if summary.get("selection"):
        sel = summary["selection"]
        lines += ["", f"Chosen by `algorithm: auto`: **{sel['chosen']}**, {sel['rounds']} rounds ({sel['method']}; "
                      f"{sel['budget']['candidates']} candidates, {sel['budget']['wall_s']:.0f} s).", "",
                  "| candidate | rounds | validation log-loss | ± SE | patients | validation AUROC (mean over sites) |",
                  "|---|---|---|---|---|---|"]
        for row in sel["candidates"]:
            mark = " **(chosen)**" if (row["candidate"], row["rounds"]) == (sel["chosen"], sel["rounds"]) else ""
            lines.append(f"| {row['candidate']}{mark} | {row['rounds']} | {fmt(row['val_log_loss'])} | "
                         f"{fmt(row.get('val_log_loss_se'))} | {row['val_patients']} | {fmt(row['val_auroc_mean'])} |")
    diagram = _reliability(summary, out_dir) if plots else None
    if diagram is not None:
        written.append(diagram)
    lines += _clinical_tables(summary)
    rejected = sum(len(r.get("rejected", {})) for r in rounds)
    lines += ["", f"Rejected replies over the run: {rejected}.", ""]
    if plots:
        lines += ["![learning curves](curves.png)", "", "![before/after adaptation](adaptation.png)", ""]
    else:
        lines += ["(No figures: matplotlib is not installed; `pip install 'fedmeta[reports]'` adds them.)", ""]
    if diagram is not None:
        lines += ["![calibration after adaptation](reliability.png)", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return [*written, report]


def _ci(d: dict[str, Any], metric: str) -> str:
    v, lo, hi = _num(d.get(metric)), _num(d.get(f"{metric}.lo")), _num(d.get(f"{metric}.hi"))
    if math.isnan(v):
        return "n/a"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if not (math.isnan(lo) or math.isnan(hi)) else f"{v:.3f}"


_CLINICAL = ("auroc", "auprc", "brier", "calibration_intercept", "calibration_slope", "sensitivity",
             "specificity", "ppv", "npv")


def _clinical_rows(name: str, d: dict[str, Any]) -> str:
    a = d.get("after", {})
    events, n = d.get("events"), d.get("n_test")
    flag = " ⚠" if isinstance(events, int) and isinstance(n, int) and min(events, n - events) < 10 else ""
    choice = d.get("adapt_scope", "?") + (f" {d['adapt_steps']}" if d.get("adapt_steps") else "")
    return (f"| {name}{flag} | {n} | {events} | {choice} | {_num(a.get('threshold')):.3f} | "
            + " | ".join(_ci(a, m) for m in _CLINICAL) + " |")


def _clinical_tables(summary: dict[str, Any]) -> list[str]:
    """Per-site clinical metrics after adaptation (95 % bootstrap intervals), per outcome."""
    sites = summary["sites"]
    if not any("brier" in d.get("after", {}) for d in sites.values()):
        return []  # images: accuracy and AUROC only
    head = ("| site | n test | events | adaptation | threshold | AUROC | AUPRC | Brier | cal. intercept | "
            "cal. slope | sensitivity | specificity | PPV | NPV |")
    rule = "|" + "---|" * 14
    outcomes = list(dict.fromkeys(o for d in sites.values() for o in d.get("outcomes", {})))
    out = ["", "## Clinical metrics after adaptation", "",
           "Risks after the site's adaptation and recalibration; sensitivity to NPV at the site's "
           "threshold (`eval.threshold`); 95 % stratified bootstrap intervals in brackets (none "
           "with `eval.shots`: means over draws). ⚠: fewer than 10 events or non-events behind the "
           "numbers. A metric a site's policy withheld (too few patients behind it) shows n/a.", ""]
    groups = [(o, {s: d["outcomes"][o] for s, d in sites.items() if o in d.get("outcomes", {})})
              for o in outcomes] or [("", sites)]
    for outcome, per_site in groups:
        if outcome:
            out += [f"### {outcome}", ""]
        out += [head, rule] + [_clinical_rows(s, d) for s, d in sorted(per_site.items())] + [""]
    return out


def _reliability(summary: dict[str, Any], out_dir: Path) -> Path | None:
    """``reliability.png`` from the sites' released risk bins (after adaptation)."""
    import numpy as np

    from fedmeta.cli.plots import reliability_diagram
    from fedmeta.common.clinical.calibration import ReliabilityCurve

    curves = {}
    for site, d in sorted(summary["sites"].items()):
        bins = d.get("reliability", {}).get("after")
        if not bins:
            continue
        n_bins = 10
        count, risk, events = np.zeros(n_bins), np.zeros(n_bins), np.zeros(n_bins)
        for b in bins:
            k = int(b["bin"])
            if 0 <= k < n_bins:
                count[k], risk[k], events[k] = b["n"], b["risk"] * b["n"], b["observed"] * b["n"]
        curves[site] = ReliabilityCurve(np.linspace(0, 1, n_bins + 1), count, risk, events)
    if not curves:
        return None
    return reliability_diagram(curves, out_dir / "reliability.png", title="Calibration after adaptation")


def _run(args: argparse.Namespace) -> int:
    for path in write_report(args.run_dir, args.out or args.run_dir):
        print(f"wrote {path}")
    return 0
