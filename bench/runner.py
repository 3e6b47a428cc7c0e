"""Running federated methods for the benchmarks, and choosing their settings on validation
splits.

Federated methods run through the real coordinator and ClientApp in one process
(:func:`fedmeta.cli.simulate.simulate` with ``backend="local"``: messages serialised as on the
wire, no Ray).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmeta.bench.rows import Row, row
from fedmeta.common.config import ExperimentConfig, load_config
from fedmeta.common.data.base import Site
from fedmeta.common.data.registry import DataSpec, data_spec, load_site
from fedmeta.common.errors import FedmetaError
from fedmeta.common.params import NDArrays
from fedmeta.server.runfolder import RunFolder
from fedmeta.server.strategy import state_from_checkpoint

log = logging.getLogger(__name__)


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
    folder = RunFolder(out_dir)
    if curve is None and folder.final.exists() and folder.summary.exists() and folder.config.exists() \
            and json.loads(folder.config.read_text()) == json.loads(cfg.to_json()):
        # The same experiment already ran to the end here (an interrupted benchmark run again):
        # its outputs are deterministic given the config, so they are reused.
        log.info("%s: reusing the finished run of the same config", out_dir)
        state, _ = folder.load_final()
        rounds = [json.loads(line) for line in folder.rounds.read_text().splitlines() if line.strip()]
        return json.loads(folder.summary.read_text()), state, rounds
    curve_points: dict[int, Mapping[str, float]] = {}
    done = [0]

    def progress(text: str) -> None:
        if curve is None or not text.startswith("round "):
            return
        done[0] += 1
        state = state_from_checkpoint(RunFolder(out_dir).load_checkpoint()[0])
        curve_points[done[0]] = dict(curve(done[0], state))

    try:
        summary = simulate(cfg, out_dir, backend="local", progress=progress)
        state, _ = RunFolder(out_dir).load_final()
    except FedmetaError as e:
        if not own_evaluation:
            raise
        log.warning("%s: the closing evaluation failed (%s); using the last checkpoint", out_dir, e)
        state = state_from_checkpoint(RunFolder(out_dir).load_checkpoint()[0])
        summary = {}
    rounds = [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    for r in rounds:
        r.update(curve_points.get(int(r["round"]), {}))
    return summary, state, rounds


def load_sites(cfg: ExperimentConfig, names: Iterable[str]) -> dict[str, Site]:
    return {n: load_site(cfg.data, n) for n in names}


def spec_of(cfg: ExperimentConfig) -> DataSpec:
    return data_spec(cfg.data)


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
