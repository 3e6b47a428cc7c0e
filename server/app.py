"""The coordinator's Flower ServerApp.

Under ``fedmeta run`` (a deployment) the experiment arrives in the run config as ``experiment``
(JSON, loaded and validated on the operator's side before the run was submitted), with
``run-name`` (the run folder's name) and ``resume`` (continue that run from its checkpoint). The
run folder is ``$FEDMETA_RUNS_DIR/<run-name>``: the coordinator's state folder (``STATE/runs``)
under ``fedmeta coordinator start``, ``~/fedmeta-runs`` otherwise (e.g. ``flwr run .``). For
``flwr run .`` users, ``config`` (a bundled experiment's name, or a YAML path read where the
ServerApp runs) and ``set`` (``key=value`` overrides separated by ``;``) work too.

Progress lines go to standard output, which Flower forwards to ``flwr log``. ``fedmeta simulate``
builds the same app around an already-loaded config with :func:`make_server_app`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmeta.common.config import ExperimentConfig, config_from_dict, load_config
from fedmeta.common.errors import ConfigError, FedmetaError
from fedmeta.protocol import transport
from fedmeta.protocol.environment import RUNS_DIR as RUNS_ENV
from fedmeta.server.driver import run_experiment
from fedmeta.server.handshake import Progress

log = logging.getLogger(__name__)

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def default_run_dir(cfg: ExperimentConfig) -> Path:
    return Path("runs") / f"{cfg.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"


def runs_root() -> Path:
    """Where a deployed run's folder goes: ``$FEDMETA_RUNS_DIR`` or ``~/fedmeta-runs``."""
    value = os.environ.get(RUNS_ENV, "")
    return Path(value) if value else Path.home() / "fedmeta-runs"


def check_run_name(name: str) -> str:
    """A run folder name: letters, digits, ``.``, ``_``, ``-`` (no path)."""
    if not RUN_NAME.match(name):
        raise ConfigError(f"run name {name!r}: use letters, digits, '.', '_' and '-' only")
    return name


def experiment_from_run_config(run_config: dict) -> ExperimentConfig:
    """The experiment of a submitted run (see the module docstring)."""
    text = str(run_config.get("experiment", ""))
    if text:
        return config_from_dict(json.loads(text), where="<submitted experiment>")
    from fedmeta.cli.simulate import resolve_config

    path = str(run_config.get("config", ""))
    overrides = [s.strip() for s in str(run_config.get("set", "")).split(";") if s.strip()]
    return load_config(resolve_config(Path(path)) if path else None, overrides)


def make_server_app(
    cfg: ExperimentConfig,
    out_dir: Path,
    *,
    expected_nodes: int,
    resume: bool = False,
    progress: Progress | None = None,
    stop_after: int | None = None,
    result: dict | None = None,
) -> ServerApp:
    """A ServerApp that runs ``cfg`` and stores the summary in ``result`` (when given)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        summary = run_experiment(
            grid, cfg, out_dir, expected_nodes=expected_nodes, resume=resume,
            progress=progress, stop_after=stop_after,
        )
        if result is not None:
            result.update(summary)

    return server_app


def _say(text: str) -> None:
    print(f"[fedmeta {time.strftime('%H:%M:%S')}] {text}", flush=True)


app = ServerApp()
transport.apply()  # this process pulls the sites' replies (see fedmeta.protocol.transport)
transport.apply()  # this process pulls the sites' replies (see fedmeta.protocol.transport)


@app.main()
def main(grid: Grid, context: Context) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fedmeta").addHandler(handler)
    logging.getLogger("fedmeta").setLevel(logging.INFO)
    os.umask(0o077)
    rc = dict(context.run_config)
    cfg = experiment_from_run_config(rc)
    name = check_run_name(str(rc.get("run-name", "")) or f"{cfg.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}")
    out = runs_root() / name
    # run.log in the run folder holds what `flwr log` streams, and why a run failed: the operator
    # of a run submitted without streaming finds it there.
    out.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(out / "run.log")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fedmeta").addHandler(to_file)
    progress_log = logging.getLogger("fedmeta.progress")
    progress_log.propagate = False  # printed by say(); the file gets it once
    progress_log.addHandler(to_file)

    def say(text: str) -> None:
        _say(text)
        progress_log.info(text)

    try:
        say(f"{cfg.algorithm}, {cfg.rounds} rounds; run folder {out}")
        summary = run_experiment(grid, cfg, out, resume=bool(rc.get("resume", False)), progress=say)
        mean = summary.get("mean", {}).get("after", {})
        say(f"finished: mean accuracy after adaptation {mean.get('accuracy', float('nan')):.3f}, "
            f"AUROC {mean.get('auroc', float('nan')):.3f}; outputs in {out}")
    except Exception as e:
        say(f"error: the run failed: {e}" if isinstance(e, FedmetaError)
            else f"error: the run failed: {type(e).__name__}: {e}")
        raise
    finally:
        logging.getLogger("fedmeta").removeHandler(to_file)
        progress_log.removeHandler(to_file)
        to_file.close()
