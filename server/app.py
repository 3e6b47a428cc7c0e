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

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmeta.common.config import ExperimentConfig, config_from_dict, load_config
from fedmeta.common.errors import ConfigError, FedmetaError
from fedmeta.protocol import flower_compat, run_name, transport
from fedmeta.protocol.environment import RUNS_DIR as RUNS_ENV
from fedmeta.server.driver import run_experiment
from fedmeta.server.handshake import Progress

log = logging.getLogger(__name__)

def default_run_dir(cfg: ExperimentConfig) -> Path:
    return Path("runs") / run_name.new(cfg.algorithm)


def runs_root() -> Path:
    """Where a deployed run's folder goes: ``$FEDMETA_RUNS_DIR`` or ``~/fedmeta-runs``."""
    value = os.environ.get(RUNS_ENV, "")
    return Path(value) if value else Path.home() / "fedmeta-runs"


def experiment_from_run_config(run_config: dict) -> ExperimentConfig:
    """The experiment of a submitted run (see the module docstring)."""
    text = str(run_config.get("experiment", ""))
    if text:
        return config_from_dict(json.loads(text), where="<submitted experiment>")
    name = str(run_config.get("config", ""))
    overrides = [s.strip() for s in str(run_config.get("set", "")).split(";") if s.strip()]
    return load_config(bundled_config(name) if name else None, overrides)


def bundled_config(name: str) -> Path:
    """A bundled experiment by name (``heart-maml``): the run config's ``config`` names one of
    fedmeta's own experiments, never a path, so a submitted run cannot make the coordinator read
    a file of its host."""
    from importlib import resources

    bundled = sorted(p.name.removesuffix(".yaml") for p in resources.files("fedmeta.configs").iterdir()
                     if p.name.endswith(".yaml"))
    if name.removesuffix(".yaml") not in bundled:
        raise ConfigError(f"run config 'config' = {name[:80]!r}: not a bundled experiment; one of "
                          f"{', '.join(bundled)} (submit another experiment as 'experiment', JSON)")
    return Path(str(resources.files("fedmeta.configs") / f"{name.removesuffix('.yaml')}.yaml"))


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


@contextlib.contextmanager
def run_log(out: Path) -> Iterator[Callable[[str], None]]:
    """Log a deployed run: fedmeta's log lines and its progress lines go to stdout (what
    ``flwr log`` streams) and to ``out/run.log``, where the operator of a run submitted without
    streaming finds them, and why a run failed. Yields ``say(text)``, the progress line writer; a
    failure is written as ``error: the run failed: …`` and re-raised."""
    out.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(out / "run.log")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_console = logging.StreamHandler(sys.stdout)
    to_console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    to_console_progress = logging.StreamHandler(sys.stdout)
    to_console_progress.setFormatter(logging.Formatter("[fedmeta %(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    fedmeta, progress = logging.getLogger("fedmeta"), logging.getLogger("fedmeta.progress")
    fedmeta.setLevel(logging.INFO)
    progress.propagate = False  # its own console format; the file gets each line once
    handlers = ((fedmeta, to_console), (fedmeta, to_file), (progress, to_console_progress), (progress, to_file))
    for logger, handler in handlers:
        logger.addHandler(handler)
    try:
        yield progress.info
    except Exception as e:
        progress.info(f"error: the run failed: {e}" if isinstance(e, FedmetaError)
                      else f"error: the run failed: {type(e).__name__}: {e}")
        raise
    finally:
        for logger, handler in handlers:
            logger.removeHandler(handler)
        to_file.close()


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    os.umask(0o077)
    if flower_compat.is_deployed_grid(grid):
        transport.apply()  # this process pulls the sites' replies (see fedmeta.protocol.transport)
    rc = dict(context.run_config)
    cfg = experiment_from_run_config(rc)
    name = run_name.chosen(str(rc.get("run-name", "")), cfg.algorithm)
    out = runs_root() / name
    with run_log(out) as say:
        say(f"{cfg.algorithm}, {cfg.rounds} rounds; run folder {out}")
        summary = run_experiment(grid, cfg, out, resume=bool(rc.get("resume", False)), progress=say)
        mean = summary.get("mean", {}).get("after", {})
        say(f"finished: mean accuracy after adaptation {mean.get('accuracy', float('nan')):.3f}, "
            f"AUROC {mean.get('auroc', float('nan')):.3f}; outputs in {out}")
