"""``fedmeta simulate``: many virtual hospitals on this machine, on Flower's simulation engine.

Each training site of the experiment's data source becomes one simulated SuperNode (a Ray actor)
holding only its own rows; the ServerApp runs the coordinator in this process. With no arguments
this is the default experiment: federated Reptile on Fed-Heart-Disease's four hospitals.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmeta.common.errors import ConfigError

if TYPE_CHECKING:
    from fedmeta.common.config import ExperimentConfig

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="run a federated meta-learning simulation on this machine")
    p.add_argument("--config", type=Path, default=None,
                   help="experiment YAML, or the name of a bundled one (e.g. heart-maml; see configs/)")
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. --set rounds=3 seed=7 inner.lr=0.1")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<algorithm>-<time>)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint (--set rounds=N extends it)")
    p.add_argument("--backend", choices=("ray", "local"), default="ray",
                   help="ray: Flower's simulation engine, one actor per site (default); local: all "
                        "sites in this process, messages still serialised as on the wire (no Ray start)")
    p.add_argument("--track", default=None, metavar="URI",
                   help="log the finished run to MLflow at URI (a local database such as "
                        "sqlite:///mlflow.db, or a server); needs the tracking extra")
    p.set_defaults(func=_run)


def resolve_config(path: Path | None) -> Path | None:
    """A file path as given, or a bundled experiment by name (``heart-maml`` -> configs/heart-maml.yaml)."""
    if path is None or path.exists():
        return path
    from importlib import resources

    bundled = resources.files("fedmeta.configs") / (path.name if path.suffix else f"{path.name}.yaml")
    if bundled.is_file() and len(path.parts) == 1:
        return Path(str(bundled))
    return path  # load_config reports the missing file


def gpu_share(n_nodes: int) -> float:
    """Fraction of one GPU each simulated site gets (0 without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    return max(torch.cuda.device_count() / max(n_nodes, 1), 0.01)


def simulate(
    cfg: ExperimentConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    progress: Any = None,
    stop_after: int | None = None,
    backend: str = "ray",
    client_app: Any = None,
) -> dict[str, Any]:
    """Run ``cfg`` with one simulated SuperNode per training site; returns the summary.

    ``backend="ray"`` uses Flower's simulation engine; ``"local"`` an in-process grid
    (:class:`fedmeta.server.local_grid.LocalGrid`) with the same ServerApp driver and ClientApp.
    """
    from fedmeta.client.app import make_client_app
    from fedmeta.server.app import make_server_app
    from fedmeta.server.driver import run_experiment
    from fedmeta.server.local_grid import LocalGrid

    client_app = client_app or make_client_app(simulated=True)

    n_nodes = simulated_nodes(cfg)
    set_threads(cfg.engine.threads)
    if backend == "local":
        grid = LocalGrid(client_app, [{"partition-id": i} for i in range(n_nodes)])
        return run_experiment(grid, cfg, out_dir, expected_nodes=n_nodes, resume=resume,
                              progress=progress, stop_after=stop_after)
    from flwr.simulation import run_simulation

    result: dict[str, Any] = {}
    server_app = make_server_app(
        cfg, out_dir, expected_nodes=n_nodes, resume=resume, progress=progress,
        stop_after=stop_after, result=result,
    )
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": 1, "num_gpus": gpu_share(n_nodes)},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "log_to_driver": False},
    }
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Each Ray actor is a new process: the thread count travels in its environment.
    os.environ["OMP_NUM_THREADS"] = str(cfg.engine.threads)
    say = progress or (lambda text: log.info("%s", text))
    say(f"starting Flower's simulation engine (Ray) with {n_nodes} sites; this takes 10-30 s")
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n_nodes,
                   backend_config=backend_config)
    if not result and stop_after is None:
        raise ConfigError(
            f"the simulation ended without a summary; see the log above (run folder {out_dir})"
        )
    return result


def simulated_nodes(cfg: ExperimentConfig) -> int:
    """How many sites a simulation of ``cfg`` starts, once its data settings are checked (every
    file they name, the site counts); a ConfigError before anything starts otherwise."""
    from fedmeta.common.data.registry import check_installed, simulation_sites

    check_installed(cfg.data)
    sites = simulation_sites(cfg.data)
    if not sites:
        raise ConfigError(f"data.source {cfg.data.source!r} names no sites to simulate (data.path "
                          "is empty: a deployment's experiment?); set data.path to the sites' folder")
    n_nodes = cfg.federation.num_supernodes or len(sites)
    if n_nodes > len(sites):
        raise ConfigError(
            f"federation.num_supernodes = {n_nodes}: the data source has only {len(sites)} sites"
        )
    if cfg.data.holdout and n_nodes < len(sites):
        raise ConfigError("federation.num_supernodes must cover every site when data.holdout is set")
    if cfg.federation.min_nodes > n_nodes:
        raise ConfigError(
            f"federation.min_nodes = {cfg.federation.min_nodes}: more than the {n_nodes} simulated sites"
        )
    return n_nodes


def set_threads(n: int) -> None:
    """Give torch ``n`` intra-op threads in this process (models this size gain nothing from
    more, and on a shared machine extra threads only contend)."""
    import torch

    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def format_table(summary: dict[str, Any]) -> str:
    """Per-hospital before/after table, and the unweighted mean over hospitals."""
    head = f"{'site':<16}{'train':>6}{'test':>6}   {'accuracy':>15}   {'AUROC':>15}   {'log-loss':>15}"
    lines = [head, " " * 28 + "   before  after" * 3, "-" * len(head)]

    def row(name: str, s: dict[str, Any], n_train: str, n_test: str) -> str:
        cells = "".join(
            f"   {s['before'][m]:>7.3f}{s['after'][m]:>7.3f} " for m in ("accuracy", "auroc", "loss")
        )
        return f"{name:<16}{n_train:>6}{n_test:>6}{cells}"

    for name, s in summary["sites"].items():
        lines.append(row(name, s, str(s["n_train"]), str(s["n_test"])))
    lines.append("-" * len(head))
    lines.append(row("mean (sites)", summary["mean"], "", ""))
    if summary.get("holdout"):
        lines.append("held out of meta-training (new hospitals, adapted locally):")
        for name, s in summary["holdout"]["sites"].items():
            lines.append(row(name, s, str(s["n_train"]), str(s["n_test"])))
        lines.append(row("mean (held out)", summary["holdout"]["mean"], "", ""))
    return "\n".join(lines)


PROGRESS = logging.getLogger("fedmeta.progress")


def _log_to_run_folder(out_dir: Path, *, verbose: bool) -> None:
    """Full log (effective config, rejected replies, Flower's messages, and every line the
    console shows) to ``run.log``; the console shows warnings and the progress lines only,
    unless ``--verbose``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out_dir / "run.log")
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if not verbose:
        for h in root.handlers:
            if h is not handler:
                h.setLevel(logging.WARNING)
        # Flower logs to its own handler; its deprecation notices for run_simulation are expected.
        logging.getLogger("flwr").setLevel(logging.ERROR)
        logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state-database migrations


def _say(text: str) -> None:
    """A line for the user: on the console and in ``run.log``."""
    print(text, flush=True)
    PROGRESS.info("%s", text)


def _run(args: argparse.Namespace) -> int:
    from fedmeta.common.config import load_config
    from fedmeta.server.app import default_run_dir
    from fedmeta.server.runfolder import load_run_config

    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the run's saved config; pass changes with --set")
        cfg = load_run_config(args.resume, args.overrides)
        out_dir = args.resume
    else:
        cfg = load_config(resolve_config(args.config), args.overrides, allow_empty=False)
        out_dir = args.out or default_run_dir(cfg)
    simulated_nodes(cfg)  # the data settings hold before the run folder is made
    from fedmeta.common import extras

    if args.backend == "ray":
        extras.require("simulation")
    if args.track:
        extras.require("tracking")
    _log_to_run_folder(out_dir, verbose=args.verbose)
    start = time.monotonic()

    def progress(text: str) -> None:
        _say(f"[{time.monotonic() - start:6.1f}s] {text}")

    _say(f"fedmeta: {cfg.algorithm} on {cfg.data.source}, {cfg.rounds} rounds -> {out_dir}")
    summary = simulate(cfg, out_dir, resume=args.resume is not None, progress=progress, backend=args.backend)
    _say("")
    _say(format_table(summary))
    _say(
        f"\n{summary['algorithm']}: {summary['rounds']} rounds in {summary['wall_s']:.1f} s; "
        f"{summary['comm']['bytes_up']:,} bytes up, {summary['comm']['bytes_down']:,} bytes down"
    )
    _say(f"outputs: {out_dir}/summary.json, rounds.jsonl, final.safetensors, run.log")
    if args.track:
        from fedmeta.cli.track import track_run

        run_id = track_run(out_dir, tracking_uri=args.track)
        _say(f"logged to MLflow at {args.track} (experiment fedmeta, run {run_id})")
    sys.stdout.flush()
    return 0
