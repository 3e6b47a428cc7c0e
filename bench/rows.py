"""Benchmark rows, their aggregation over seeds, Markdown tables and the files they go to.

Every benchmark returns a list of *rows*, flat dicts with at least ``benchmark``, ``method``,
``metric``, ``value`` and ``site`` (a hospital's name, or ``"mean"`` for the unweighted mean over
hospitals, the unit FLamby averages over), plus ``k`` (labelled patients or shots) where it
applies, ``seed`` for a single run and ``std``/``n`` for rows aggregated over seeds or draws.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Row = dict[str, Any]


def summary_rows(
    summary: Mapping[str, Any], *, benchmark: str, method: str, phase: str, seed: int,
    metrics: Sequence[str] = ("accuracy", "auroc"), **extra: Any,
) -> list[Row]:
    """Per-site and mean rows of one phase (``before``/``after`` adaptation) of a run summary."""
    rows: list[Row] = []
    for site, s in summary["sites"].items():
        for m in metrics:
            rows.append(row(benchmark, method, m, s[phase][m], site=site, seed=seed, **extra))
    for m in metrics:
        rows.append(row(benchmark, method, m, summary["mean"][phase][m], site="mean", seed=seed, **extra))
    return rows


def row(benchmark: str, method: str, metric: str, value: float | None, **extra: Any) -> Row:
    """One result row; an undefined value (NaN) is stored as ``None`` (strict JSON)."""
    v = None if value is None or not math.isfinite(float(value)) else float(value)
    return {"benchmark": benchmark, "method": method, "metric": metric, "value": v, **extra}


def aggregate_seeds(rows: Sequence[Row], *, by: Sequence[str] = ("method", "metric", "site", "k")) -> list[Row]:
    """Mean, standard deviation and count over seeds/draws of rows that agree on ``by``."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(b) for b in by)].append(r)
    out: list[Row] = []
    for _key, members in groups.items():
        values = [m["value"] for m in members if m["value"] is not None]
        first = {k: v for k, v in members[0].items() if k not in ("seed", "value", "draw")}
        out.append({
            **first,
            "value": float(np.mean(values)) if values else None,
            "std": float(np.std(values)) if values else None,
            "n": len(values),
        })
    return out


def pivot_table(rows: Sequence[Row], *, metric: str, columns: Sequence[Any], column_key: str = "site",
                title: str = "", methods: Sequence[str] | None = None, digits: int = 3) -> str:
    """A markdown table: one line per method, one column per ``column_key`` value (mean ± std)."""
    cell: dict[tuple[str, Any], Row] = {}
    order: list[str] = []
    for r in rows:
        if r["metric"] != metric:
            continue
        cell[(r["method"], r.get(column_key))] = r
        if r["method"] not in order:
            order.append(r["method"])
    lines = [f"**{title}**", ""] if title else []
    lines.append("| method | " + " | ".join(str(c) for c in columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    for m in methods or order:
        cells = []
        for c in columns:
            found = cell.get((m, c))
            if found is None or found["value"] is None:
                cells.append("–")
            elif found.get("std") is not None and found.get("n", 1) > 1:
                cells.append(f"{found['value']:.{digits}f} ± {found['std']:.{digits}f}")
            else:
                cells.append(f"{found['value']:.{digits}f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_rows(rows: Sequence[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(rows), indent=2) + "\n")


def emit(text: str, out_dir: Path, name: str) -> None:
    """Print a benchmark table for the user and keep a copy next to the JSON."""
    print(text, flush=True)
    with (out_dir / f"{name}.md").open("a") as f:
        f.write(text + "\n\n")


class Timer:
    """Wall-clock seconds since creation (for the runtime rows)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.t0
