"""Shared machinery of the evaluation benchmarks: running methods, per-site rows, tables, plots.

Every benchmark returns a list of *rows*, flat dicts with at least ``benchmark``, ``method``,
``metric``, ``value`` and ``site`` (a hospital's name, or ``"mean"`` for the unweighted mean over
hospitals, the unit FLamby averages over), plus ``k`` (labelled patients or shots) where it
applies, ``seed`` for a single run and ``std``/``n`` for rows aggregated over seeds or draws.

Federated methods run through the real coordinator and ClientApp in one process
(:func:`fedmeta.cli.simulate.simulate` with ``backend="local"``: messages serialised as on the
wire, no Ray). Centralised references (pooled training, a model per hospital) are plain
full-batch gradient descent on the same model, written here.

Hyperparameters are never chosen on a test split. :func:`register_validation_sources` adds
``<source>-val`` data sources whose "test" split is carved out of each site's *training* split,
so a benchmark can select settings on it before scoring the real test splits once.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from fedmeta.common import params as P
from fedmeta.common.config import ExperimentConfig, load_config
from fedmeta.common.data.base import Site, TabularSite
from fedmeta.common.data.registry import (
    DataSpec,
    Source,
    _source,
    data_spec,
    load_site,
    register_source,
)
from fedmeta.common.errors import FedmetaError
from fedmeta.common.experiment import build_model_for, initial_parameters
from fedmeta.common.meta.inner import adapt, forward
from fedmeta.common.meta.types import InnerConfig, Params
from fedmeta.common.metrics import binary_metrics
from fedmeta.common.params import NDArrays, from_numpy

log = logging.getLogger(__name__)

Row = dict[str, Any]
VAL_SUFFIX = "-val"
VAL_FRACTION = 0.3
VAL_SEED = 11


# -- validation sources ---------------------------------------------------------------------------
def _carve_validation(site: Site) -> Site:
    """The site's training split cut into train (70 %) and validation (30 %, stored as "test"),
    stratified on the first outcome; the real test split is not touched."""
    if not isinstance(site, TabularSite):
        raise TypeError("validation splits are defined for tabular sites only")
    labels = site.y_train[:, 0]
    counts = np.bincount(labels[labels >= 0], minlength=2)
    strat = labels if counts.min() > 2 and (labels >= 0).all() else None
    idx = np.arange(site.n_train)
    tr, va = train_test_split(idx, test_size=VAL_FRACTION, random_state=VAL_SEED, stratify=strat)
    return replace(
        site, x_train=site.x_train[tr], y_train=site.y_train[tr], x_test=site.x_train[va],
        y_test=site.y_train[va], row_ids_train=(), row_ids_test=(),
    )


def register_validation_sources(*names: str) -> None:
    """Register ``NAME-val`` for each data source ``NAME`` (see :func:`_carve_validation`)."""
    from fedmeta.common.config import DataConfig

    for name in names:
        base = _source(DataConfig(source=name))

        def spec(cfg: DataConfig, base: Source = base, name: str = name) -> DataSpec:
            return base.spec(replace(cfg, source=name))

        def load(cfg: DataConfig, site: str, base: Source = base, name: str = name) -> Site:
            return _carve_validation(base.load(replace(cfg, source=name), site))

        register_source(name + VAL_SUFFIX, Source(spec, load))


# -- running federated methods --------------------------------------------------------------------
def config(overrides: Sequence[str], path: str | Path | None = None) -> ExperimentConfig:
    """An experiment config from a YAML file (optional) and ``key=value`` overrides."""
    return load_config(path, list(overrides))


def quiet() -> None:
    """Set up a benchmark process: Flower's and fedmeta's per-round logging kept out of the
    tables, and one torch thread. The models here are tiny; on a shared 2-core machine torch's
    intra-op threads only contend (measured: 10 Reptile rounds took 27 s with the default
    threads under load and 3.9 s with one)."""
    for name in ("flwr", "fedmeta"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(1)


CurveFn = Callable[[int, NDArrays], Mapping[str, float]]


def run_federated(
    cfg: ExperimentConfig, out_dir: Path, *, curve: CurveFn | None = None, own_evaluation: bool = False,
) -> tuple[dict[str, Any], NDArrays, list[dict[str, Any]]]:
    """Run ``cfg`` on the in-process grid; returns ``(summary, final state, per-round log)``.

    ``own_evaluation``: the benchmark scores the final state itself, so a failure of the
    coordinator's closing evaluation of the training sites (e.g. a 7-way FedAvg classifier asked
    for 5-way novel-class episodes) is logged and the last round's checkpointed state returned
    with an empty summary.

    ``curve(round, state)``, when given, is called after every round with the checkpointed global
    state (θ, and Meta-SGD's rates) and its metrics are added to that round's log line: how the
    learning curves and the bytes-to-accuracy figures are measured without touching the driver.
    """
    from fedmeta.cli.simulate import simulate

    out_dir.mkdir(parents=True, exist_ok=True)
    curve_points: dict[int, Mapping[str, float]] = {}
    done = [0]

    def progress(text: str) -> None:
        if curve is None or not text.startswith("round "):
            return
        done[0] += 1
        arrays, _ = P.load(out_dir / "checkpoint.safetensors")
        state = {k[6:]: v for k, v in arrays.items() if k.startswith("theta/")}
        curve_points[done[0]] = dict(curve(done[0], state))

    try:
        summary = simulate(cfg, out_dir, backend="local", progress=progress)
        state, _ = P.load(out_dir / "final.safetensors")
    except FedmetaError as e:
        if not own_evaluation:
            raise
        log.warning("%s: the closing evaluation failed (%s); using the last checkpoint", out_dir, e)
        arrays, _ = P.load(out_dir / "checkpoint.safetensors")
        state = {k[6:]: v for k, v in arrays.items() if k.startswith("theta/")}
        summary = {}
    rounds = [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    for r in rounds:
        r.update(curve_points.get(int(r["round"]), {}))
    return summary, state, rounds


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


# -- centralised references and local adaptation --------------------------------------------------
def model_and_init(cfg: ExperimentConfig, spec: DataSpec) -> tuple[torch.nn.Module, Params]:
    """The configured model and θ₀ (the same initialisation the federated runs start from)."""
    model = build_model_for(cfg, spec)
    return model, from_numpy(initial_parameters(cfg, spec))


def fit(model: torch.nn.Module, params: Params, x: np.ndarray, y: np.ndarray, *, steps: int, lr: float,
        proximal: float = 0.0, only: Iterable[str] | None = None) -> Params:
    """Full-batch gradient descent on the cross-entropy of ``(x, y)`` from ``params``.

    ``proximal`` adds ``λ/2 ||φ − params||²`` (a Gaussian prior centred on the starting point);
    ``only`` restricts training to the named tensors (e.g. the output bias, to refit an intercept).
    """
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    if only is None:
        return adapt(model, params, xt, yt, InnerConfig(steps=steps, lr=lr, proximal=proximal))
    keep = set(only)
    fixed = {k: v.detach() for k, v in params.items() if k not in keep}
    free = {k: v.detach().clone().requires_grad_() for k, v in params.items() if k in keep}
    for _ in range(steps):
        out = forward(model, {**fixed, **free}, xt)
        loss = torch.nn.functional.cross_entropy(out, yt)
        grads = torch.autograd.grad(loss, list(free.values()))
        with torch.no_grad():
            for (k, v), g in zip(free.items(), grads, strict=True):
                v -= lr * (g + proximal * (v - params[k].detach()))
    return {**fixed, **{k: v.detach() for k, v in free.items()}}


def score(model: torch.nn.Module, params: Params, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy at 0.5, AUROC and log-loss of the positive-class probability on ``(x, y)``."""
    with torch.no_grad():
        logits = forward(model, params, torch.as_tensor(x, dtype=torch.float32))
        p = torch.softmax(logits.double(), dim=1)[:, 1].numpy()
    return binary_metrics(np.asarray(y), p)


def adapt_state(model: torch.nn.Module, state: NDArrays, x: np.ndarray, y: np.ndarray, *,
                steps: int, lr: float, proximal: float, metasgd_steps: int) -> Params:
    """Local adaptation of a global state on ``(x, y)``: Meta-SGD with its learned rates
    (``metasgd_steps`` steps), otherwise ``steps`` full-batch steps of ``lr`` pulled toward θ."""
    from fedmeta.client.task import split_state

    theta_np, lrs_np = split_state(state)
    theta = from_numpy(theta_np)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    if lrs_np is not None:
        return adapt(model, theta, xt, yt, InnerConfig(steps=metasgd_steps, lr=1.0), lrs=from_numpy(lrs_np))
    if steps == 0:
        return theta
    return adapt(model, theta, xt, yt, InnerConfig(steps=steps, lr=lr, proximal=proximal))


def training_rows(site: TabularSite, outcome: int = 0) -> tuple[np.ndarray, np.ndarray]:
    known = site.y_train[:, outcome] >= 0
    return site.x_train[known], site.y_train[known, outcome]


def test_rows(site: TabularSite, outcome: int = 0) -> tuple[np.ndarray, np.ndarray]:
    known = site.y_test[:, outcome] >= 0
    return site.x_test[known], site.y_test[known, outcome]


def load_sites(cfg: ExperimentConfig, names: Iterable[str]) -> dict[str, Site]:
    return {n: load_site(cfg.data, n) for n in names}


def spec_of(cfg: ExperimentConfig) -> DataSpec:
    return data_spec(cfg.data)


# -- aggregation, tables, files -------------------------------------------------------------------
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


# -- plots ----------------------------------------------------------------------------------------
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


# -- methods and their selection on validation splits ---------------------------------------------
@dataclass(frozen=True)
class FedMethod:
    """A federated method of a benchmark, scored on its global model (``phase = "before"``:
    FedAvg, FedYogi) or after local adaptation (``"after"``: fine-tuning, meta-learners).

    ``overrides``: config settings fixed a priori. ``candidates``: alternative extra settings, one
    of which :func:`select` picks on the validation source, maximising the same phase's accuracy.
    """

    key: str
    overrides: tuple[str, ...]
    label: str
    phase: str = "after"
    candidates: tuple[tuple[str, ...], ...] = ((),)

    def __post_init__(self) -> None:
        if self.phase not in ("before", "after"):
            raise ValueError(f"FedMethod {self.key}: phase = {self.phase!r}: use before or after")
        if not self.candidates:
            raise ValueError(f"FedMethod {self.key}: needs at least one candidate (use ((),))")


def select(method: FedMethod, base: Sequence[str], *, val_source: str, out_dir: Path,
           benchmark: str, config_path: str | Path | None = None,
           extra: Sequence[str] = (), limit: int | None = None) -> tuple[tuple[str, ...], list[Row]]:
    """Pick ``method``'s candidate with the best mean validation accuracy (seed 0, the
    ``val_source`` whose "test" split is carved from the training splits); returns the chosen
    overrides and one ``val_accuracy`` row per candidate. ``limit`` keeps only the first
    candidates (the smoke tests)."""
    candidates = method.candidates[:limit] if limit else method.candidates
    if len(candidates) == 1:
        return candidates[0], []
    rows: list[Row] = []
    best: tuple[float, tuple[str, ...]] = (-1.0, candidates[0])
    for i, cand in enumerate(candidates):
        cfg = config([*base, *method.overrides, *cand, *extra, f"data.source={val_source}", "seed=0"],
                     config_path)
        summary, _, _ = run_federated(cfg, out_dir / f"select-{method.key}-{i}")
        acc = float(summary["mean"][method.phase]["accuracy"])
        rows.append(row(benchmark, method.label, "val_accuracy", acc, site="mean", candidate=" ".join(cand)))
        if acc > best[0]:
            best = (acc, cand)
    return best[1], rows
