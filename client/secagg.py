"""The hospital side of secure aggregation: a ClientApp with Flower's ``secaggplus_mod``.

The mod runs the SecAgg+ key agreement and masking around the train handler; the handler only
turns the coordinator's θ (legacy ``FitIns`` parameters) into this site's delta and example count.
Deltas are clipped to the L2 bound the server's :func:`fedmeta.server.secagg.secagg_settings`
assumes, optionally noised for distributed differential privacy, and sent in float64 (SecAgg+
quantises to up to 2²⁹ levels, more than float32 resolves).
See :mod:`fedmeta.server.secagg` for what the protocol protects and what it rules out.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fedmeta.common.privacy import add_gaussian_noise, clip_update, site_noise_std

# (theta as a list of arrays, node context, round config) -> (delta list, number of examples)
LocalDelta = Callable[[list[np.ndarray], Context, dict[str, object]], tuple[list[np.ndarray], int]]


def bound_delta(
    delta: list[np.ndarray],
    *,
    l2_bound: float,
    noise_multiplier: float = 0.0,
    n_sites: int = 1,
    generator: torch.Generator | None = None,
) -> list[np.ndarray]:
    """Clip ``delta`` to ``l2_bound`` and add distributed Gaussian noise; float64 out."""
    named = {str(i): torch.from_numpy(np.asarray(d, dtype=np.float64)) for i, d in enumerate(delta)}
    clipped, _ = clip_update(named, l2_bound)
    std = site_noise_std(l2_bound, noise_multiplier, n_sites=n_sites, distributed=True)
    noised = add_gaussian_noise(clipped, std, generator=generator)
    return [noised[str(i)].numpy() for i in range(len(delta))]


def make_secagg_client_app(
    local_delta: LocalDelta,
    *,
    l2_bound: float,
    noise_multiplier: float = 0.0,
    n_sites: int = 1,
    seed: int | None = None,
) -> ClientApp:
    """A ClientApp answering SecAgg+ train rounds with ``local_delta``'s (bounded) delta."""
    app = ClientApp(mods=[secaggplus_mod])

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        theta = [np.asarray(a) for a in parameters_to_ndarrays(fitins.parameters)]
        delta, num_examples = local_delta(theta, context, dict(fitins.config))
        gen = None
        if seed is not None:
            gen = torch.Generator().manual_seed(seed + int(context.node_id) % 2**31)
        bounded = bound_delta(delta, l2_bound=l2_bound, noise_multiplier=noise_multiplier,
                              n_sites=n_sites, generator=gen)
        fitres = FitRes(
            status=Status(code=Code.OK, message="ok"),
            parameters=ndarrays_to_parameters(bounded),
            num_examples=int(num_examples),
            metrics={},
        )
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    return app
