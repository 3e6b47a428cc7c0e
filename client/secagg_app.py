"""fedmeta's ClientApp for secure aggregation (``fedmeta run --secagg``): updates via SecAgg+.

The coordinator's :mod:`fedmeta.server.secagg_app` sends θ as legacy parameters (arrays in the
order of :func:`fedmeta.common.experiment.initial_parameters`) and the experiment as JSON in the
round config; this app computes the site's update (a Reptile delta, or a MAML/FOMAML/ProtoNet
meta-gradient; an algorithm whose record says secure aggregation cannot carry it is refused)
with the same local code as the plain ClientApp (:func:`fedmeta.sitecore.train.train_update`)
and hands it to ``secaggplus_mod``.

The request is parsed once (:func:`fedmeta.protocol.request.parse_request`). At a deployed site
the worker parses it, checks it against the site's policy and serves it with :func:`serving`, so
that the delta, its clip and its noise are computed from that same checked object.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import parameters_to_ndarrays

from fedmeta.client.app import site_of
from fedmeta.client.secagg import make_secagg_client_app
from fedmeta.common import algorithms
from fedmeta.common.experiment import initial_parameters, site_rng
from fedmeta.protocol.flower_compat import Mod, arrayrecord_to_parameters
from fedmeta.protocol.request import RequestError, SecAggBounds, SiteRequest, parse_request
from fedmeta.sitecore.data import spec_of
from fedmeta.sitecore.policy import patient_floor
from fedmeta.sitecore.train import train_update

_CHECKED: ContextVar[SiteRequest | None] = ContextVar("fedmeta_checked_request", default=None)


@contextmanager
def serving(request: SiteRequest) -> Iterator[None]:
    """Serve the message ``request`` was parsed from with that parsed, checked request."""
    token = _CHECKED.set(request)
    try:
        yield
    finally:
        _CHECKED.reset(token)


def request_of(msg: Message) -> SiteRequest:
    """The checked request for ``msg`` (deployed site), or ``msg`` parsed now (simulation)."""
    checked = _CHECKED.get()
    if checked is not None:
        if checked.message_id != msg.metadata.message_id:
            raise RequestError("the message served is not the one that was checked")
        return checked
    request = parse_request(msg, secure_aggregation=True)
    if request is None:
        raise RequestError("a secure-aggregation train step without the experiment")
    return request


def site_update(msg: Message, context: Context) -> tuple[list[np.ndarray], int, SecAggBounds | None]:
    """This site's update for one round (a delta or a meta-gradient, as the experiment's
    algorithm computes it), as a list in θ's parameter order."""
    patient_floor(context.node_config)  # a node without a floor (no worker, no simulation) sends nothing
    request = request_of(msg)
    assert request.arrays is not None  # the parse requires the parameters
    cfg = request.experiment
    why = algorithms.get(cfg.algorithm).secure_aggregation
    if why:
        raise RequestError(f"secure aggregation cannot carry algorithm {cfg.algorithm!r}: {why}")
    theta = [np.asarray(a) for a in parameters_to_ndarrays(arrayrecord_to_parameters(request.arrays, keep_input=True))]
    site = site_of(context, cfg)
    spec = spec_of(site)
    reference = initial_parameters(cfg, spec)
    names = list(reference)
    if [a.shape for a in theta] != [reference[n].shape for n in names]:
        raise RequestError(f"θ's {len(theta)} arrays are not the experiment's model ({len(names)} arrays)")
    update = train_update(cfg, spec, site, dict(zip(names, theta, strict=True)),
                          rng=site_rng(cfg, site.name, request.server_round))
    delta = [np.asarray(update.arrays[n], dtype=np.float64) for n in names]
    return delta, update.num_examples, request.secagg


def make_app(mods: Sequence[Mod] = ()) -> ClientApp:
    """The SecAgg+ ClientApp; ``mods`` run before the protocol's own."""
    return make_secagg_client_app(site_update, mods=mods)


app = make_app()
