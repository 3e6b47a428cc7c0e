"""fedmeta's ServerApp for secure aggregation (``fedmeta run --secagg``): rounds over SecAgg+.

Reads the same run config as :mod:`fedmeta.server.app` and runs ``rounds`` rounds of the
experiment's algorithm (any whose record allows it: Reptile, MAML, FOMAML, ProtoNets; see
:func:`refusal`) in which the coordinator only ever sees the example-weighted mean of the sites'
updates (see
:mod:`fedmeta.server.secagg` for what this protects and rules out). The protocol's settings come
from :func:`~fedmeta.server.secagg.secagg_settings` for the sites connected at the start: every
site is a neighbour of every other and one may drop out per round. Sites clip their deltas to
``privacy.clip`` in L2 and, with ``privacy.dp``, add their share of the Gaussian noise sized for
the worst case the dropout threshold allows, so that the released sum always carries at least
``privacy.noise_multiplier × privacy.clip``; ε at ``privacy.delta`` is reported per round. The
experiment's outer optimiser applies the mean update. Writes ``summary.json``, ``rounds.jsonl``
and ``final.safetensors`` into ``out``; no per-site evaluation (that would need per-site replies,
which is what this mode hides).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.server import Grid, ServerApp

from fedmeta.common import algorithms
from fedmeta.common.config import AUTO, ExperimentConfig
from fedmeta.common.data.registry import DataSpec
from fedmeta.common.errors import ConfigError
from fedmeta.common.params import l2_norm
from fedmeta.common.privacy import epsilon
from fedmeta.protocol import keys as K
from fedmeta.server import audit as audit_log
from fedmeta.server.handshake import wait_for_nodes
from fedmeta.server.runfolder import RunFolder
from fedmeta.server.secagg import SecAggSettings, SecureMean, run_secure_rounds, secagg_settings

log = logging.getLogger(__name__)


def settings_for(cfg: ExperimentConfig, spec: DataSpec, n_sites: int) -> SecAggSettings:
    """SecAgg+ settings for ``n_sites`` sites of experiment ``cfg`` (one may drop out); a site's
    weight is bounded by the most examples its algorithm's reply may claim."""
    per_round = algorithms.get(cfg.algorithm).max_examples(cfg, spec, 0)
    return secagg_settings(n_sites=n_sites, l2_bound=cfg.privacy.clip, max_examples=per_round,
                           dropout_tolerance=1, timeout=cfg.federation.timeout_s)


def refusal(cfg: ExperimentConfig, spec: DataSpec) -> str | None:
    """Why a secure-aggregation run of ``cfg`` cannot be held (None: it can): the one check for
    ``fedmeta run --secagg``, ``fedmeta deploy local --secagg`` and this ServerApp."""
    if cfg.algorithm == AUTO:
        carried = ", ".join(a for a in algorithms.names() if not algorithms.get(a).secure_aggregation)
        return (f"algorithm {AUTO} chooses among candidates (the federated GLM first) that secure "
                f"aggregation does not carry; set one it carries ({carried}), e.g. --set algorithm=reptile")
    why = algorithms.get(cfg.algorithm).secure_aggregation
    if why:
        return f"secure aggregation cannot carry algorithm {cfg.algorithm!r}: {why}"
    if spec.needs_agreement:
        return (f"data.source {cfg.data.source!r}: the sites agree on their features first, which "
                "secure aggregation runs do not hold; run without secure aggregation")
    return None


def secure_rounds(grid: Grid, context: Context, cfg: ExperimentConfig, out: Path) -> dict:
    """Run ``cfg`` over SecAgg+; returns the summary written to ``out``."""
    from fedmeta.common.data.registry import data_spec
    from fedmeta.common.experiment import initial_parameters

    spec = data_spec(cfg.data)
    why = refusal(cfg, spec)
    if why is not None:
        raise ConfigError(why)
    folder = RunFolder(out)
    theta0 = initial_parameters(cfg, spec)
    names = list(theta0)
    n_sites = len(wait_for_nodes(grid, max(cfg.federation.min_nodes, 3), cfg.federation.timeout_s))
    settings = settings_for(cfg, spec, n_sites)
    noise_sites = int(settings.reconstruction_threshold)
    log.info("effective configuration: %s; SecAgg+ %s", cfg.to_json(), settings)
    audit = audit_log.from_env()
    folder.reset_rounds([])
    t0 = time.monotonic()
    t_round = [time.monotonic()]

    def on_round(server_round: int, mean: list[np.ndarray], theta: list[np.ndarray]) -> None:
        eps = (epsilon(rounds=server_round, noise_multiplier=cfg.privacy.noise_multiplier,
                       delta=cfg.privacy.delta) if cfg.privacy.dp else None)
        folder.append_round({
            "round": server_round, "secure_aggregation": True,
            "mean_delta_norm": l2_norm({str(i): m for i, m in enumerate(mean)}),
            "epsilon": eps, "wall_s": round(time.monotonic() - t_round[0], 4),
        })
        t_round[0] = time.monotonic()
        log.info("round %d/%d: secure mean update applied (ε = %s)", server_round, cfg.rounds, eps)

    strategy = SecureMean(theta=[theta0[n] for n in names], outer=cfg.outer, min_sites=n_sites,
                          on_round=on_round, update_kind=algorithms.get(cfg.algorithm).update_kind)
    strategy.on_fit_config_fn = lambda r: {  # type: ignore[assignment]
        K.EXPERIMENT: cfg.to_json(), K.ROUND: r, K.SECAGG_L2_BOUND: cfg.privacy.clip,
        K.SECAGG_NOISE: cfg.privacy.noise_multiplier if cfg.privacy.dp else 0.0,
        K.SECAGG_N_SITES: noise_sites,
    }
    if audit is not None:
        audit.record("run_started", run_id=int(context.run_id), algorithm=f"{cfg.algorithm}+secagg",
                     rounds=cfg.rounds, config_sha256="", nodes=sorted(grid.get_node_ids()))
    run_secure_rounds(grid, context, strategy, rounds=cfg.rounds, settings=settings)
    theta = dict(zip(names, strategy.theta, strict=True))
    folder.save_final(theta, {"algorithm": cfg.algorithm, "rounds": cfg.rounds, "secure_aggregation": True,
                              "config": cfg.to_json()})
    done = folder.read_rounds(cfg.rounds)
    summary = {
        "algorithm": cfg.algorithm, "secure_aggregation": True, "rounds": cfg.rounds,
        "rounds_completed": len(done), "wall_s": round(time.monotonic() - t0, 3),
        "config": cfg.to_dict(),
        "secagg": {"sites": n_sites, "num_shares": settings.num_shares,
                   "reconstruction_threshold": settings.reconstruction_threshold,
                   "clipping_range": settings.clipping_range,
                   "quantization_range": settings.quantization_range,
                   "resolution": settings.resolution,
                   "noise_shared_by": noise_sites},
        "epsilon": done[-1]["epsilon"] if done else None,
        "params": {"count": int(sum(v.size for v in theta.values())), "file": folder.final.name},
    }
    folder.write_json(folder.summary, summary)
    if audit is not None:
        audit.run_finished(run_id=int(context.run_id), status="completed", rounds_completed=len(done))
    return summary


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedmeta.protocol import run_name
    from fedmeta.server.app import experiment_from_run_config, runs_root

    rc = dict(context.run_config)
    cfg = experiment_from_run_config(rc)
    name = run_name.chosen(str(rc.get("run-name", "")), "secagg")
    secure_rounds(grid, context, cfg, runs_root() / name)
