"""The hospital side of secure aggregation: a ClientApp with Flower's ``secaggplus_mod``.

The mod runs the SecAgg+ key agreement and masking around the train handler; the handler only
turns the coordinator's θ (legacy ``FitIns`` parameters) into this site's delta and example count.
Deltas are clipped to the L2 bound the server's SecAgg+ settings assume, optionally noised for
distributed differential privacy, and sent in float64 (SecAgg+ quantises to up to 2²⁹ levels,
more than float32 resolves).
See :mod:`fedmeta.server.secagg` for what the protocol protects and what it rules out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fedmeta.common.privacy import privatize
from fedmeta.protocol import keys as K

# (theta as a list of arrays, node context, round config) -> (delta list, number of examples)
LocalDelta = Callable[[list[np.ndarray], Context, Mapping[str, object]], tuple[list[np.ndarray], int]]


def bound_delta(
    delta: list[np.ndarray],
    *,
    l2_bound: float,
    noise_multiplier: float = 0.0,
    n_sites: int = 1,
    seed: int | None = None,
) -> list[np.ndarray]:
    """Clip ``delta`` to ``l2_bound`` and add this site's share of the Gaussian noise (the sum
    of ``n_sites`` shares carries ``noise_multiplier × l2_bound``); float64 out."""
    named = {str(i): np.asarray(d, dtype=np.float64) for i, d in enumerate(delta)}
    noised, _ = privatize(named, clip=l2_bound, noise_multiplier=noise_multiplier, seed=seed,
                          n_sites=n_sites, distributed=True)
    return [noised[str(i)] for i in range(len(delta))]


def make_secagg_client_app(
    local_delta: LocalDelta,
    *,
    l2_bound: float | None = None,
    noise_multiplier: float = 0.0,
    n_sites: int = 1,
    seed: int | None = None,
    mods: Sequence[Mod] = (),
) -> ClientApp:
    """A ClientApp answering SecAgg+ train rounds with ``local_delta``'s (bounded) delta.

    The bound and the noise come from the round config (``secagg-l2-bound``,
    ``secagg-noise-multiplier``, ``secagg-n-sites``) when the server sends them, else from the
    arguments; with neither a bound the reply is refused (fail closed: an unbounded delta would be
    silently clipped coordinate-wise by the quantiser). ``seed`` (tests only) makes the noise
    reproducible; otherwise it comes from :mod:`secrets`.
    """
    app = ClientApp(mods=[*mods, secaggplus_mod])

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        config = dict(fitins.config)
        bound = float(config.get(K.SECAGG_L2_BOUND, l2_bound or 0.0))  # type: ignore[arg-type]
        if not bound > 0:
            raise ValueError(f"no L2 bound for the secure-aggregation delta ({K.SECAGG_L2_BOUND})")
        noise = float(config.get(K.SECAGG_NOISE, noise_multiplier))  # type: ignore[arg-type]
        sites = int(config.get(K.SECAGG_N_SITES, n_sites))  # type: ignore[arg-type]
        theta = [np.asarray(a) for a in parameters_to_ndarrays(fitins.parameters)]
        delta, num_examples = local_delta(theta, context, config)
        node_seed = None if seed is None else seed + int(context.node_id) % 2**31
        bounded = bound_delta(delta, l2_bound=bound, noise_multiplier=noise, n_sites=sites,
                              seed=node_seed)
        fitres = FitRes(
            status=Status(code=Code.OK, message="ok"),
            parameters=ndarrays_to_parameters(bounded),
            num_examples=int(num_examples),
            metrics={},
        )
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    return app
