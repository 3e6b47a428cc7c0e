"""``fedmeta track RUN_DIR``: log a finished run to MLflow, where a team watches its other experiments.

Optional (``pip install 'fedmeta[tracking]'``) and off unless asked for: ``fedmeta track`` or
``fedmeta simulate --track URI``. It reads only the run folder, as ``fedmeta report`` does, and logs
one MLflow run:

- **parameters**: the experiment's configuration, flattened (``tasks.support``, ``outer.lr``, …);
- **metrics per round** (step = round): every number of ``rounds.jsonl``'s round records (query
  losses, bytes up and down, wall time, ε, …), and each site's query loss after adaptation;
- **final metrics**: the mean over sites and every site's test metrics before and after
  adaptation (``site.<name>.after.auroc``), as the sites released them;
- **artefacts**: ``summary.json``, ``rounds.jsonl``, ``selection.json``, the report and its
  figures and any model card in the folder;
- **tags**: the algorithm, the run folder's name, fedmeta's version.

The tracking store is a local database (``sqlite:///mlflow.db``, the default) or a server the
operator names (``http(s)://…``). MLflow's own usage telemetry is turned off in this process
(``MLFLOW_DISABLE_TELEMETRY``, ``DO_NOT_TRACK``) unless the operator set those variables: the
only connection made is to the tracking server named.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedmeta.common.errors import FedmetaError

DEFAULT_URI = "sqlite:///mlflow.db"
ARTEFACTS = ("summary.json", "rounds.jsonl", "selection.json", "report.md", "curves.png",
             "adaptation.png", "reliability.png")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("track", help="log a finished run to MLflow (the tracking extra)")
    p.add_argument("run_dir", type=Path, help="a run folder written by fedmeta simulate / run")
    p.add_argument("--tracking-uri", default=DEFAULT_URI,
                   help=f"MLflow tracking store: a local database or a server (default {DEFAULT_URI})")
    p.add_argument("--experiment", default="fedmeta", help="MLflow experiment name (default fedmeta)")
    p.set_defaults(func=_run)


def _flat(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _flat(f"{prefix}.{k}" if prefix else str(k), v)
    else:
        yield prefix, value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def run_metrics(summary: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]
                ) -> tuple[dict[str, list[tuple[int, float]]], dict[str, float]]:
    """What is logged: ``{metric: [(round, value), …]}`` per round and the final metrics."""
    per_round: dict[str, list[tuple[int, float]]] = {}
    for record in rounds:
        step = int(record.get("round", 0))
        values = {k: v for k, v in record.items() if k != "round"}
        for site, metrics in (record.get("site_metrics") or {}).items():
            values[f"site.{site}.query_loss_after"] = metrics.get("query_loss_after")
        for key, value in values.items():
            number = _number(value)
            if number is not None:
                per_round.setdefault(key, []).append((step, number))
    final: dict[str, float] = {}
    for phase in ("before", "after"):
        for key, value in (summary.get("mean") or {}).get(phase, {}).items():
            if (number := _number(value)) is not None:
                final[f"mean.{phase}.{key}"] = number
        for site, d in (summary.get("sites") or {}).items():
            for key, value in (d.get(phase) or {}).items():
                if (number := _number(value)) is not None:
                    final[f"site.{site}.{phase}.{key}"] = number
    for key in ("wall_s", "rounds_completed"):
        if (number := _number(summary.get(key))) is not None:
            final[key] = number
    return per_round, final


def _artefact_root(tracking_uri: str) -> str | None:
    """Where a local database's artefacts go: beside it (``mlflow-artifacts/``), not in whatever
    folder the command runs from (MLflow's default, ``./mlruns``); a server decides its own."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlflow-artifacts").as_uri()


def _metric_key(key: str) -> str:
    # MLflow allows letters, digits, _ - . / and spaces in names; a site name may hold others
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def track_run(run_dir: Path, *, tracking_uri: str = DEFAULT_URI, experiment: str = "fedmeta") -> str:
    """Log the finished run in ``run_dir`` to MLflow; returns the MLflow run id."""
    from fedmeta.cli.report import read_run
    from fedmeta.common import extras

    summary, rounds = read_run(run_dir)  # the folder is checked before MLflow is touched
    extras.require("tracking")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    from fedmeta.common.extras import installed_version

    per_round, final = run_metrics(summary, rounds)
    params = [Param(k, str(v)[:500]) for k, v in _flat("", summary.get("config", {}))]
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        found = client.get_experiment_by_name(experiment)
        experiment_id = (found.experiment_id if found is not None
                         else client.create_experiment(experiment, artifact_location=_artefact_root(tracking_uri)))
        run = client.create_run(experiment_id, run_name=run_dir.resolve().name, tags={
            "fedmeta.algorithm": str(summary.get("algorithm", "")),
            "fedmeta.run_folder": run_dir.resolve().name, "fedmeta.version": installed_version()})
        run_id = run.info.run_id
        metrics = [Metric(_metric_key(k), v, 0, step) for k, steps in per_round.items() for step, v in steps]
        metrics += [Metric(_metric_key(k), v, 0, 0) for k, v in final.items()]
        for i in range(0, max(len(params), 1), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(run_id, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        client.log_batch(run_id, tags=[RunTag("fedmeta.rounds", str(len(rounds)))])
        for name in (*ARTEFACTS, *sorted(p.name for p in run_dir.glob("*model-card*.md"))):
            if (run_dir / name).is_file():
                client.log_artifact(run_id, str(run_dir / name))
        client.set_terminated(run_id, "FINISHED")
    except mlflow.exceptions.MlflowException as e:
        raise FedmetaError(f"MLflow tracking at {tracking_uri}: {e.message.splitlines()[0][:300]}") from None
    return str(run_id)


def _run(args: argparse.Namespace) -> int:
    run_id = track_run(args.run_dir, tracking_uri=args.tracking_uri, experiment=args.experiment)
    print(f"logged {args.run_dir} to MLflow at {args.tracking_uri} (experiment {args.experiment}, "
          f"run {run_id})")
    return 0


__all__ = ["DEFAULT_URI", "register", "run_metrics", "track_run"]
