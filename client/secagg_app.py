"""fedmeta's ClientApp for secure aggregation (``fedmeta run --secagg``): Reptile deltas via SecAgg+.

The coordinator's :mod:`fedmeta.server.secagg_app` sends θ as legacy parameters (arrays in the
order of :func:`fedmeta.common.experiment.initial_parameters`) and the experiment as JSON in the
round config; this app computes the site's Reptile delta with the same local code as the
plain ClientApp (:func:`fedmeta.sitecore.train.train_update`) and hands it to ``secaggplus_mod``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedmeta.client.app import site_of
from fedmeta.client.secagg import make_secagg_client_app
from fedmeta.common.config import config_from_dict
from fedmeta.common.experiment import initial_parameters, site_rng
from fedmeta.protocol import keys as K
from fedmeta.sitecore.data import spec_of
from fedmeta.sitecore.train import train_update


def reptile_delta(
    theta: list[np.ndarray], context: Context, config: Mapping[str, object]
) -> tuple[list[np.ndarray], int]:
    """This site's Reptile delta for one round, as a list in θ's parameter order."""
    cfg = config_from_dict(json.loads(str(config[K.EXPERIMENT])),
                           where="<experiment from coordinator>")
    site = site_of(context, cfg)
    spec = spec_of(site)
    names = list(initial_parameters(cfg, spec))
    if len(names) != len(theta):
        raise ValueError(f"θ has {len(theta)} arrays, the model {len(names)}")
    server_round = int(config.get(K.ROUND, 0))  # type: ignore[call-overload]
    update = train_update(cfg, spec, site, dict(zip(names, theta, strict=True)),
                               rng=site_rng(cfg, site.name, server_round))
    return [np.asarray(update.arrays[n], dtype=np.float64) for n in names], update.num_examples


def make_app(mods: Sequence[Mod] = ()) -> ClientApp:
    """The SecAgg+ ClientApp; ``mods`` run before the protocol's own (e.g. the site's policy)."""
    return make_secagg_client_app(reptile_delta, mods=mods)


app = make_app()
