"""Secure aggregation of the sites' updates with Flower's SecAgg+ (Bell et al. 2020, CCS).

Flower 1.39 implements SecAgg+ only on its legacy path: a ``LegacyContext`` running
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` with a legacy ``Strategy`` on the server,
and ``secaggplus_mod`` on every ClientApp. The protocol masks each site's *legacy FitRes
parameters* and reveals only their example-weighted mean to the server. It is value-agnostic, so
it carries updates as well as weights: a site returns its round's update (a Reptile delta
``Δ_i = φ_i − θ``, or a MAML/FOMAML/ProtoNet meta-gradient) as its "parameters" and the server
receives ``Σ n_i Δ_i / Σ n_i`` (:class:`SecureMean` then applies ``θ ← θ + β Δ̄`` for deltas, an
outer step along the mean gradient for gradients; the algorithm record says which one it can
carry: ``Algorithm.secure_aggregation``). What it costs, and why it is a separate path from the
Message-API strategy:

* Values are clipped to ``[-R, R]`` and stochastically quantised to ``Q`` levels before masking,
  so the mean is exact only up to ``2R/Q`` per coordinate (unbiased). :func:`secagg_settings`
  picks ``R`` from the L2 bound the sites clip their deltas to (a coordinate never exceeds the
  vector's L2 norm) and the largest ``Q`` whose masked sum cannot overflow the 2³² modulus.
* The server never sees an individual delta, so per-site validation (non-finite values, norm
  bound, robust median / trimmed mean) and compression (fp16, int8, top-k) cannot run; sites must
  clip their own deltas (``common.params.clip_update``), and a malformed delta is bounded by the
  clipping but not detected. Secure aggregation and robust aggregation are alternatives.
* Metrics (counts, losses) travel in clear beside the masked vector.

With differential privacy the two combine: each site clips to ``C`` and adds
``N(0, (zC)²/t)`` (``common.privacy.site_noise_std(distributed=True)``), ``t`` the
reconstruction threshold: the fewest sites whose masked values SecAgg+ can still sum. However
many sites drop out, a released sum holds at least ``t`` sites' noise, so it carries noise of
standard deviation at least ``zC`` and the ε reported for ``z`` holds; no single site's delta is
ever revealed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Context
from flwr.common import (
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from fedmeta.common.config import OuterConfig
from fedmeta.protocol.flower_compat import ClientProxy
from fedmeta.server.outer import OuterOptimizer

log = logging.getLogger(__name__)

MODULUS = 2**32  # Flower requires modulus_range <= 2**32


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+ parameters. ``clipping_range`` R bounds every coordinate; ``quantization_range``
    Q is the number of levels; ``max_weight`` bounds a site's example count (its weight)."""

    num_shares: int | float
    reconstruction_threshold: int | float
    clipping_range: float
    quantization_range: int
    max_weight: float
    modulus_range: int = MODULUS
    timeout: float | None = None

    @property
    def resolution(self) -> float:
        """Quantisation step ``2R/Q`` of one coordinate of one site's (weighted) delta."""
        return 2 * self.clipping_range / self.quantization_range


def secagg_settings(
    *, n_sites: int, l2_bound: float, max_examples: int, dropout_tolerance: int = 1,
    timeout: float | None = None,
) -> SecAggSettings:
    """Settings for ``n_sites`` sites whose deltas are clipped to L2 norm ``l2_bound``.

    Every site is a neighbour of every other (``num_shares = n``; Flower needs ``n > 2``); a key
    is reconstructable from ``n − dropout_tolerance`` shares (Flower needs fewer than ``n``). ``Q`` is the largest power of two with ``n·Q`` below
    the modulus (the masked sum of ``n`` values in ``[0, Q)`` must not wrap around).
    """
    if n_sites < 3:
        raise ValueError(f"SecAgg+ needs at least 3 sites, got {n_sites}")
    if not l2_bound > 0:
        raise ValueError(f"l2_bound must be > 0, got {l2_bound}")
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    if not 1 <= dropout_tolerance <= n_sites - 2:
        raise ValueError(
            f"dropout_tolerance must be in [1, {n_sites - 2}] for {n_sites} sites, "
            f"got {dropout_tolerance}"
        )
    levels_bits = 31 - math.ceil(math.log2(n_sites + 1))
    return SecAggSettings(
        num_shares=n_sites,
        reconstruction_threshold=n_sites - dropout_tolerance,
        clipping_range=float(l2_bound),
        quantization_range=2**levels_bits,
        max_weight=float(max_examples),
        timeout=timeout,
    )


class SecureMean(FedAvg):
    """Legacy strategy for SecAgg+: receives the securely averaged update and hands the
    experiment's outer optimiser its direction: ``−Δ̄`` for deltas (SGD with ``lr = β`` is
    Reptile's ``θ + β Δ̄``), the mean meta-gradient itself for gradients (MAML, FOMAML,
    ProtoNets); momentum, Adam and Yogi act on the same direction, as in the plain path.

    Under ``SecAggPlusWorkflow`` every ``FitRes`` handed to :meth:`aggregate_fit` carries the same
    aggregate (the workflow writes it into each); this class takes it once. ``on_round`` is called
    with ``(round, mean_delta, theta)`` after each update (tests and logging).
    """

    def __init__(
        self,
        *,
        theta: Sequence[np.ndarray],
        outer: OuterConfig,
        min_sites: int,
        on_round: Callable[[int, list[np.ndarray], list[np.ndarray]], None] | None = None,
        update_kind: str = "delta",
    ) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=min_sites,
            min_available_clients=min_sites,
            min_evaluate_clients=0,
            initial_parameters=ndarrays_to_parameters([np.asarray(t) for t in theta]),
        )
        self._names = [str(i) for i in range(len(theta))]
        self._optimizer = OuterOptimizer(
            {n: np.array(t, copy=True) for n, t in zip(self._names, theta, strict=True)}, outer)
        self.on_round = on_round
        if update_kind not in ("delta", "gradient"):
            raise ValueError(f"update_kind {update_kind!r}: delta or gradient")
        self._sign = -1.0 if update_kind == "delta" else 1.0

    @property
    def theta(self) -> list[np.ndarray]:
        params = self._optimizer.params()
        return [params[n] for n in self._names]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results:
            log.warning("round %d: no securely aggregated result (failures: %d)", server_round,
                        len(failures))
            return None, {}
        mean_delta = parameters_to_ndarrays(results[0][1].parameters)
        theta = self.theta
        if len(mean_delta) != len(theta) or any(
                d.shape != t.shape for d, t in zip(mean_delta, theta, strict=True)):
            raise ValueError("the secure aggregate does not match θ's arrays")
        self._optimizer.step({n: self._sign * np.asarray(d, dtype=t.dtype)
                              for n, d, t in zip(self._names, mean_delta, theta, strict=True)})
        if self.on_round is not None:
            self.on_round(server_round, mean_delta, self.theta)
        n = sum(r.num_examples for _, r in results)
        log.info("round %d: applied the SecAgg+ mean delta of %d sites (%d examples)",
                 server_round, len(results), n)
        return ndarrays_to_parameters(self.theta), {"num-sites": len(results), "num-examples": n}


def run_secure_rounds(
    grid: Grid, context: Context, strategy: SecureMean, *, rounds: int, settings: SecAggSettings
) -> None:
    """Run ``rounds`` rounds of SecAgg+ with ``strategy`` (Flower's legacy workflow)."""
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=settings.num_shares,
            reconstruction_threshold=settings.reconstruction_threshold,
            max_weight=settings.max_weight,
            clipping_range=settings.clipping_range,
            quantization_range=settings.quantization_range,
            modulus_range=settings.modulus_range,
            timeout=settings.timeout,
        )
    )
    workflow(grid, legacy)


def make_secagg_server_app(
    strategy: SecureMean, *, rounds: int, settings: SecAggSettings
) -> ServerApp:
    """A ServerApp running ``rounds`` rounds of SecAgg+ with ``strategy``."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_secure_rounds(grid, context, strategy, rounds=rounds, settings=settings)

    return app
