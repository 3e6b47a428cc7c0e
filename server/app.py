"""The coordinator's Flower ServerApp.

Under ``flwr run`` (deployment or Flower's own simulation) the experiment comes from the run
config: ``config`` (path of an experiment YAML, empty for the defaults), ``overrides``
(``"key=value key=value"``), ``out`` (run folder; default ``runs/<algorithm>-<time>``) and
``resume`` (continue the run in ``out`` from its checkpoint). ``fedmeta simulate`` builds the same
app around an already-loaded config with :func:`make_server_app`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmeta.common.config import ExperimentConfig, load_config
from fedmeta.server.driver import run_experiment
from fedmeta.server.handshake import Progress

log = logging.getLogger(__name__)


def default_run_dir(cfg: ExperimentConfig) -> Path:
    return Path("runs") / f"{cfg.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"


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


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = load_config(str(rc.get("config", "")) or None, str(rc.get("overrides", "")).split())
    out = Path(str(rc.get("out", "")) or default_run_dir(cfg))
    run_experiment(grid, cfg, out, resume=bool(rc.get("resume", False)))
    log.info("run finished; outputs in %s", out)
