"""The hospital side of secure aggregation: a ClientApp with Flower's ``secaggplus_mod``.

The mod runs the SecAgg+ key agreement and masking around the train handler; the handler only
turns the coordinator's θ (legacy ``FitIns`` parameters) into this site's delta and example count.
Deltas are clipped to the L2 bound the server's SecAgg+ settings assume, optionally noised for
distributed differential privacy, and sent in float64 (SecAgg+ quantises to up to 2²⁹ levels,
more than float32 resolves).
See :mod:`fedmeta.server.secagg` for what the protocol protects and what it rules out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from fedmeta.common.privacy import privatize
from fedmeta.protocol.flower_compat import Mod, fitres_to_recorddict
from fedmeta.protocol.request import SecAggBounds

# (the train message, node context) -> (delta list, number of examples, the round's bounds as
# parsed from the checked request, or None to use the app's own arguments)
LocalDelta = Callable[[Message, Context], tuple[list[np.ndarray], int, SecAggBounds | None]]


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

    The bound, noise and noise-sharing count come from ``local_delta`` (fedmeta's SecAgg+ app takes
    them from the request it parsed once and checked against the experiment,
    :func:`fedmeta.protocol.request.parse_request`), else from the arguments; with no bound the
    reply is refused (fail closed: an unbounded delta would be silently clipped coordinate-wise
    by the quantiser). ``seed`` (tests only) makes the noise reproducible; otherwise it comes
    from :mod:`secrets`.
    """
    app = ClientApp(mods=[*mods, secaggplus_mod])

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        delta, num_examples, bounds = local_delta(msg, context)
        bound = bounds.l2_bound if bounds is not None else float(l2_bound or 0.0)
        if not bound > 0:
            raise ValueError("no L2 bound for the secure-aggregation delta")
        noise = bounds.noise_multiplier if bounds is not None else noise_multiplier
        sites = bounds.n_sites if bounds is not None else n_sites
        node_seed = None if seed is None else seed + int(context.node_id) % 2**31
        bounded = bound_delta(delta, l2_bound=bound, noise_multiplier=noise, n_sites=sites,
                              seed=node_seed)
        fitres = FitRes(
            status=Status(code=Code.OK, message="ok"),
            parameters=ndarrays_to_parameters(bounded),
            num_examples=int(num_examples),
            metrics={},
        )
        return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    return app
