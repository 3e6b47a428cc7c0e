"""fedmeta's ServerApp for secure aggregation (``fedmeta run --secagg``): Reptile over SecAgg+.

Reads the same run config as :mod:`fedmeta.server.app` and runs ``rounds`` rounds of Reptile in
which the coordinator only ever sees the example-weighted mean of the sites' deltas (see
:mod:`fedmeta.server.secagg` for what this protects and rules out). The protocol's settings come
from :func:`~fedmeta.server.secagg.secagg_settings` for the sites connected at the start: every
site is a neighbour of every other and one may drop out per round. Sites clip their deltas to
``privacy.clip`` in L2 and, with ``privacy.dp``, add their share of the Gaussian noise sized for
the worst case the dropout threshold allows, so that the released sum always carries at least
``privacy.noise_multiplier × privacy.clip``; ε at ``privacy.delta`` is reported per round. The
experiment's outer optimiser applies the mean delta. Writes ``summary.json``, ``rounds.jsonl``
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

from fedmeta.common.config import ExperimentConfig
from fedmeta.common.errors import ConfigError
from fedmeta.common.params import l2_norm
from fedmeta.common.privacy import epsilon
from fedmeta.protocol import keys as K
from fedmeta.server import audit as audit_log
from fedmeta.server.handshake import wait_for_nodes
from fedmeta.server.runfolder import RunFolder
from fedmeta.server.secagg import SecAggSettings, SecureReptile, run_secure_rounds, secagg_settings

log = logging.getLogger(__name__)


def settings_for(cfg: ExperimentConfig, n_sites: int) -> SecAggSettings:
    """SecAgg+ settings for ``n_sites`` sites of experiment ``cfg`` (one may drop out)."""
    t = cfg.tasks
    per_round = t.meta_batch * (t.support + t.query) * t.meta_batches  # a site's weight
    return secagg_settings(n_sites=n_sites, l2_bound=cfg.privacy.clip, max_examples=per_round,
                           dropout_tolerance=1, timeout=cfg.federation.timeout_s)


def secure_reptile(grid: Grid, context: Context, cfg: ExperimentConfig, out: Path) -> dict:
    """Run ``cfg`` (Reptile) over SecAgg+; returns the summary written to ``out``."""
    from fedmeta.common.data.registry import data_spec
    from fedmeta.common.experiment import initial_parameters

    if cfg.algorithm != "reptile":
        raise ConfigError(f"secure aggregation carries Reptile deltas; algorithm is {cfg.algorithm!r}")
    folder = RunFolder(out)
    spec = data_spec(cfg.data)
    if spec.needs_agreement:
        raise ConfigError(f"data.source {cfg.data.source!r}: the sites' feature agreement is not "
                          "held in secure aggregation runs; run without secure aggregation")
    theta0 = initial_parameters(cfg, spec)
    names = list(theta0)
    n_sites = len(wait_for_nodes(grid, max(cfg.federation.min_nodes, 3), cfg.federation.timeout_s))
    settings = settings_for(cfg, n_sites)
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
        log.info("round %d/%d: secure mean delta applied (ε = %s)", server_round, cfg.rounds, eps)

    strategy = SecureReptile(theta=[theta0[n] for n in names], outer=cfg.outer, min_sites=n_sites,
                             on_round=on_round)
    strategy.on_fit_config_fn = lambda r: {  # type: ignore[assignment]
        K.EXPERIMENT: cfg.to_json(), K.ROUND: r, K.SECAGG_L2_BOUND: cfg.privacy.clip,
        K.SECAGG_NOISE: cfg.privacy.noise_multiplier if cfg.privacy.dp else 0.0,
        K.SECAGG_N_SITES: noise_sites,
    }
    if audit is not None:
        audit.record("run_started", run_id=int(context.run_id), algorithm="reptile+secagg",
                     rounds=cfg.rounds, config_sha256="", nodes=sorted(grid.get_node_ids()))
    run_secure_rounds(grid, context, strategy, rounds=cfg.rounds, settings=settings)
    theta = dict(zip(names, strategy.theta, strict=True))
    folder.save_final(theta, {"algorithm": "reptile", "rounds": cfg.rounds, "secure_aggregation": True,
                              "config": cfg.to_json()})
    done = folder.read_rounds(cfg.rounds)
    summary = {
        "algorithm": "reptile", "secure_aggregation": True, "rounds": cfg.rounds,
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
    secure_reptile(grid, context, cfg, runs_root() / name)
