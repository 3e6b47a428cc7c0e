"""fedmeta's ServerApp for secure aggregation (``fedmeta run --secagg``): Reptile over SecAgg+.

Reads the same run config as :mod:`fedmeta.server.app` (``config``, ``overrides``, ``out``) and
runs ``rounds`` rounds of Reptile where the coordinator only ever sees the example-weighted mean of
the sites' deltas (see :mod:`fedmeta.server.secagg` for what this protects and rules out). Sites
clip their deltas to ``privacy.clip`` in L2 (the bound SecAgg+'s quantiser is sized for) and, with
``privacy.dp``, add their share of the Gaussian noise so that the sum carries
``privacy.noise_multiplier × privacy.clip``; ε at ``privacy.delta`` is reported per round.
Writes ``summary.json``, ``rounds.jsonl`` and ``final.safetensors`` into ``out``; no per-site
evaluation (that would need per-site replies, which is what this mode hides).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from fedmeta.client.secagg import L2_BOUND_KEY, N_SITES_KEY, NOISE_KEY
from fedmeta.common import params as P
from fedmeta.common.config import load_config
from fedmeta.common.data.registry import data_spec
from fedmeta.common.experiment import initial_parameters
from fedmeta.common.privacy import epsilon
from fedmeta.server import audit as audit_log
from fedmeta.server.secagg import SecAggSettings, SecureReptile

log = logging.getLogger(__name__)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = load_config(str(rc.get("config", "")) or None, str(rc.get("overrides", "")).split())
    if cfg.algorithm != "reptile":
        raise ValueError(f"secure aggregation carries Reptile deltas; algorithm is {cfg.algorithm!r}")
    out = Path(str(rc.get("out", "")) or f"runs/secagg-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    spec = data_spec(cfg.data)
    theta0 = initial_parameters(cfg, spec)
    names = list(theta0)
    n_sites = max(cfg.federation.min_nodes, 3)
    # Every sampled site is a neighbour of every other; two thirds of the shares rebuild a key.
    # A site's weight is its examples per round, fixed by the task settings: the quantiser then
    # keeps its full resolution (2·clip / 2^24 per coordinate, up to 64 sites).
    per_round = cfg.tasks.meta_batch * (cfg.tasks.support + cfg.tasks.query) * cfg.tasks.meta_steps
    settings = SecAggSettings(
        num_shares=1.0, reconstruction_threshold=0.67, clipping_range=cfg.privacy.clip,
        quantization_range=2**24, max_weight=float(per_round), timeout=cfg.federation.timeout_s,
    )
    log.info("effective configuration: %s; SecAgg+ %s", cfg.to_json(), settings)
    audit = audit_log.from_env()
    rounds_path = out / "rounds.jsonl"
    rounds_path.write_text("")
    t0 = time.monotonic()
    t_round = [time.monotonic()]

    def on_round(server_round: int, mean: list[np.ndarray], theta: list[np.ndarray]) -> None:
        eps = (epsilon(rounds=server_round, noise_multiplier=cfg.privacy.noise_multiplier,
                       delta=cfg.privacy.delta) if cfg.privacy.dp else None)
        line = {"round": server_round, "secure_aggregation": True,
                "mean_delta_norm": float(np.sqrt(sum(float(np.sum(m**2)) for m in mean))),
                "epsilon": eps, "wall_s": round(time.monotonic() - t_round[0], 4)}
        t_round[0] = time.monotonic()
        with rounds_path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        log.info("round %d/%d: secure mean delta applied (ε = %s)", server_round, cfg.rounds, eps)

    strategy = SecureReptile(theta=[theta0[n] for n in names], outer_lr=cfg.outer.lr,
                             min_sites=n_sites, on_round=on_round)
    strategy.on_fit_config_fn = lambda r: {  # type: ignore[assignment]
        "experiment": cfg.to_json(), "server-round": r, L2_BOUND_KEY: cfg.privacy.clip,
        NOISE_KEY: cfg.privacy.noise_multiplier if cfg.privacy.dp else 0.0,
        N_SITES_KEY: n_sites,
    }
    if audit is not None:
        audit.record("run_started", run_id=int(context.run_id), algorithm="reptile+secagg",
                     rounds=cfg.rounds, config_sha256="", nodes=sorted(grid.get_node_ids()))
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.rounds),
                           strategy=strategy)
    DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=settings.num_shares, reconstruction_threshold=settings.reconstruction_threshold,
        max_weight=settings.max_weight, clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range, modulus_range=settings.modulus_range,
        timeout=settings.timeout,
    ))(grid, legacy)
    theta = dict(zip(names, strategy.theta, strict=True))
    P.save(out / "final.safetensors", theta, {"algorithm": "reptile", "rounds": cfg.rounds,
                                              "secure_aggregation": True})
    done = [json.loads(x) for x in rounds_path.read_text().splitlines() if x]
    summary = {
        "algorithm": "reptile", "secure_aggregation": True, "rounds": cfg.rounds,
        "rounds_completed": len(done), "wall_s": round(time.monotonic() - t0, 3),
        "config": cfg.to_dict(),
        "secagg": {"num_shares": settings.num_shares,
                   "reconstruction_threshold": settings.reconstruction_threshold,
                   "clipping_range": settings.clipping_range,
                   "quantization_range": settings.quantization_range,
                   "resolution": settings.resolution},
        "epsilon": done[-1]["epsilon"] if done else None,
        "params": {"count": int(sum(v.size for v in theta.values())), "file": "final.safetensors"},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if audit is not None:
        audit.run_finished(run_id=int(context.run_id), status="completed",
                           rounds_completed=len(done))
