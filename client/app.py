"""A hospital's Flower ClientApp: unpack the coordinator's message, compute locally, reply.

Which site a node is comes from its node config (see :func:`fedmeta.sitecore.data.site_for_node`).
Every message is parsed once into a :class:`~fedmeta.protocol.request.SiteRequest`; the handlers
compute from that object alone (at a deployed site, the very object its policy checked: see
:mod:`fedmeta.client.worker`), call the site core (:mod:`fedmeta.sitecore`) and pack: the reply
holds parameter-shaped arrays and aggregate numbers only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmeta.client.wire import encode_reply, receive_state
from fedmeta.common.config import ExperimentConfig
from fedmeta.common.data.base import Site, TabularSite
from fedmeta.common.experiment import site_rng
from fedmeta.common.params import NDArrays
from fedmeta.common.privacy import privatize
from fedmeta.protocol import keys as K
from fedmeta.protocol.flower_compat import Mod
from fedmeta.protocol.records import MetricValues, record_from_arrays
from fedmeta.protocol.request import RequestError, SiteRequest, parse_request
from fedmeta.sitecore.data import site_for_node, spec_of
from fedmeta.sitecore.evaluate import evaluate_site, is_count, released_metrics
from fedmeta.sitecore.layout import compare_layout
from fedmeta.sitecore.policy import patient_floor
from fedmeta.sitecore.train import train_update

log = logging.getLogger(__name__)


def site_of(context: Context, cfg: ExperimentConfig) -> Site:
    """The site this node serves (loaded once per process)."""
    return site_for_node(context.node_config, cfg)


def hello(request: SiteRequest, context: Context) -> RecordDict:
    """Greeting: the site's name, split sizes (counts only) and how its data compares with the
    coordinator's layout (the coordinator's own feature names; the site's others only counted)."""
    site = site_of(context, request.experiment)
    check = compare_layout(request.layout or {}, site)
    return RecordDict({
        K.SITE: ConfigRecord({"name": site.name}),
        K.METRICS: MetricRecord({K.N_TRAIN: site.n_train, K.N_TEST: site.n_test,
                                 K.LAYOUT_OK: int(check.ok), K.LAYOUT_EXTRA: check.extra}),
        K.LAYOUT: ConfigRecord({"describe": check.describe()[:500]}),
    })


def code_counts(request: SiteRequest, context: Context) -> RecordDict:
    """Feature agreement (MEDS sites): patients per code, and per code with a numeric value, only
    for codes seen in at least k of this site's patients; k is the site file's ``min_subjects``
    raised to the site's patient floor (``min-patients``, set by the deployed site's policy). No
    other number, no code below k, no patient's id, time or value is sent."""
    from fedmeta.common.data.meds.source import shared_counts
    from fedmeta.sitecore.data import meds_site_for_node

    site = meds_site_for_node(context.node_config, request.experiment)
    shared = shared_counts(site, policy_floor=patient_floor(context.node_config))
    return RecordDict({
        K.SITE: ConfigRecord({"name": shared.name}),
        K.METRICS: MetricRecord({K.MIN_SUBJECTS: shared.min_subjects}),
        K.CODE_COUNTS: MetricRecord(dict(shared.codes)),
        K.NUMERIC_COUNTS: MetricRecord(dict(shared.numeric)),
    })


def _threads(cfg: ExperimentConfig) -> None:
    import torch

    if torch.get_num_threads() != cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)


def _model_state(state: NDArrays, cfg: ExperimentConfig, site: Site) -> NDArrays:
    """``state`` if its arrays are exactly the experiment's model (and algorithm state) at this
    site, by name and shape; the computation runs on what is sent, so the checks on the
    experiment (its model size above all) hold only if the two agree."""
    from fedmeta.common import algorithms
    from fedmeta.common.experiment import build_model_for

    model = build_model_for(cfg, spec_of(site))
    theta = {k: np.zeros(tuple(v.shape), dtype=np.float32) for k, v in model.named_parameters()}
    expected = {k: v.shape for k, v in algorithms.get(cfg.algorithm).initial_state(theta, cfg).items()}
    got = {k: np.shape(v) for k, v in state.items()}
    if got != expected:
        raise RequestError("the state sent is not the experiment's model: "
                           f"{len(got)} arrays of {sum(int(np.prod(v)) for v in got.values())} values, "
                           f"expected {len(expected)} of {sum(int(np.prod(v)) for v in expected.values())}")
    return state


def train(request: SiteRequest, context: Context) -> RecordDict:
    cfg = request.experiment
    assert request.arrays is not None  # the parse requires them for a train request
    _threads(cfg)
    site = site_of(context, cfg)
    state = _model_state(receive_state(request.arrays, request.downlink, context), cfg, site)
    update = train_update(cfg, spec_of(site), site, state, rng=site_rng(cfg, site.name, request.server_round))
    arrays = update.arrays
    s = update.stats
    metrics: MetricValues = {K.NUM_EXAMPLES: int(update.num_examples), K.N_TASKS: int(s.n_tasks)}
    if cfg.privacy.dp:
        # Clip and noise the update here, on the site (local DP); losses computed from patients
        # are not covered by the mechanism, so they are not sent.
        arrays, clip = privatize(arrays, clip=cfg.privacy.clip, noise_multiplier=cfg.privacy.noise_multiplier)
        log.info("DP: update norm %.4g clipped to %.4g", clip.norm, cfg.privacy.clip)
    else:
        metrics.update({K.N_QUERY: int(s.n_query), K.LOSS_AFTER: float(s.query_loss_after)})
        if math.isfinite(s.query_loss_before):  # computed only with engine.before_stats
            metrics[K.LOSS_BEFORE] = float(s.query_loss_before)
    record, encoding = encode_reply(arrays, cfg, context)
    return RecordDict({
        K.UPDATE: record,
        K.ENCODING: encoding,
        K.SITE: ConfigRecord({"name": site.name}),
        K.METRICS: MetricRecord(metrics),
    })


def evaluate(request: SiteRequest, context: Context) -> RecordDict:
    cfg = request.experiment
    _threads(cfg)
    site = site_of(context, cfg)
    state = _model_state(request.decoded, cfg, site)
    result = evaluate_site(cfg, spec_of(site), site, state, rng=site_rng(cfg, site.name, 0, "eval"))
    # the site's patient floor (deployment: node.yaml's policy); a simulation has none
    floor = patient_floor(context.node_config)
    outcomes = site.outcomes if isinstance(site, TabularSite) else ()
    released, _ = released_metrics(result, outcomes, floor=floor)
    metrics: MetricValues = {k: (int(v) if is_count(k) else float(v)) for k, v in released.items()}
    return RecordDict({K.SITE: ConfigRecord({"name": site.name}), K.METRICS: MetricRecord(metrics)})


def glm_sums(request: SiteRequest, context: Context) -> RecordDict:
    """The federated GLM's Newton step: this site's summed gradient and Hessian of the
    logistic log-likelihood at the coefficients sent (first outcome; unlabelled rows left out),
    its row count and summed loss. Released only on at least the site's ``min-patients`` rows
    (the policy also checked the split before any data was read)."""
    from fedmeta.common.errors import DataError
    from fedmeta.common.glm import site_sums

    site = site_of(context, request.experiment)
    if not isinstance(site, TabularSite):
        raise DataError("the federated GLM fits tables; this site holds images")
    beta = request.decoded  # the arrays the policy checked
    if set(beta) != {"beta"} or beta["beta"].shape != (site.n_features + 1,):
        raise ValueError(f"glm: expected one 'beta' of {site.n_features + 1} coefficients")
    labelled = site.y_train[:, 0] >= 0
    floor = patient_floor(context.node_config)
    if int(labelled.sum()) < floor:
        raise DataError(f"glm: {int(labelled.sum())} labelled training rows, below the floor {floor}")
    sums = site_sums(site.x_train[labelled], site.y_train[labelled, 0], beta["beta"])
    return RecordDict({
        K.SUMS: record_from_arrays({"gradient": sums.gradient, "hessian": sums.hessian}),
        K.SITE: ConfigRecord({"name": site.name}),
        K.METRICS: MetricRecord({K.NUM_EXAMPLES: sums.n, K.LOSS_SUM: sums.loss}),
    })


#: The handler of each phase: each computes from the parsed request alone.
HANDLERS: dict[str, Callable[[SiteRequest, Context], RecordDict]] = {
    K.HELLO: hello, K.COUNTS: code_counts, K.TRAIN: train, K.EVALUATE: evaluate, K.GLM: glm_sums,
}


def answer(request: SiteRequest, context: Context) -> RecordDict:
    """The reply's content for a parsed request (at a deployed site: the request its policy
    checked). A node without a patient floor (neither the site worker nor fedmeta's simulation
    set one) answers nothing."""
    patient_floor(context.node_config)
    return HANDLERS[request.phase](request, context)


def _serve(msg: Message, context: Context) -> Message:
    request = parse_request(msg)
    assert request is not None  # only secure-aggregation protocol steps parse to None
    return Message(content=answer(request, context), reply_to=msg)


def simulated_node(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """A node of fedmeta's simulation holds this machine's own data under no site policy: its
    patient floor is :data:`~fedmeta.protocol.keys.SIMULATED_FLOOR` (a deployed site's worker
    sets its own from ``node.yaml``; a node with neither releases nothing)."""
    context.node_config.setdefault(K.MIN_PATIENTS, K.SIMULATED_FLOOR)
    return call_next(msg, context)


def make_client_app(mods: Sequence[Mod] = (), *, simulated: bool = False) -> ClientApp:
    """A ClientApp with fedmeta's handlers; ``mods`` wrap every message (e.g. DP, auditing).
    ``simulated``: for fedmeta's simulation (:func:`simulated_node` first)."""
    client_app = ClientApp(mods=[simulated_node, *mods] if simulated else list(mods))
    client_app.query()(_serve)
    client_app.train()(_serve)
    client_app.evaluate()(_serve)
    return client_app


app = make_client_app()
