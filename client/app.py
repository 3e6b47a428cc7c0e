"""A hospital's Flower ClientApp: unpack the coordinator's message, compute locally, reply.

Which site a node is comes from its node config (see :func:`fedmeta.sitecore.data.site_for_node`).
The handlers only unpack, call the site core (:mod:`fedmeta.sitecore`) and pack: the reply holds
parameter-shaped arrays and aggregate numbers only.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedmeta.client.wire import encode_reply, receive_state
from fedmeta.common.config import ExperimentConfig, config_from_dict
from fedmeta.common.data.base import Site, TabularSite
from fedmeta.common.experiment import site_rng
from fedmeta.common.privacy import privatize
from fedmeta.protocol import keys as K
from fedmeta.protocol.records import MetricValues, arrays_from_record, count_in
from fedmeta.sitecore.data import site_for_node, spec_of
from fedmeta.sitecore.evaluate import evaluate_site, is_count, released_metrics
from fedmeta.sitecore.layout import compare_layout
from fedmeta.sitecore.train import train_update

log = logging.getLogger(__name__)


def experiment_of(msg: Message) -> ExperimentConfig:
    record = msg.content[K.CONFIG]
    return config_from_dict(json.loads(str(record[K.EXPERIMENT])), where="<experiment from coordinator>")


def site_of(context: Context, cfg: ExperimentConfig) -> Site:
    """The site this node serves (loaded once per process)."""
    return site_for_node(context.node_config, cfg)


def hello(msg: Message, context: Context) -> Message:
    """Greeting: the site's name, split sizes (counts only) and how its data compares with the
    coordinator's layout (the coordinator's own feature names; the site's others only counted)."""
    cfg = experiment_of(msg)
    site = site_of(context, cfg)
    config = msg.content[K.CONFIG]
    expected = json.loads(str(config[K.LAYOUT])) if K.LAYOUT in config else {}
    check = compare_layout(expected, site)
    content = RecordDict({
        K.SITE: ConfigRecord({"name": site.name}),
        K.METRICS: MetricRecord({K.N_TRAIN: site.n_train, K.N_TEST: site.n_test,
                                 K.LAYOUT_OK: int(check.ok), K.LAYOUT_EXTRA: check.extra}),
        K.LAYOUT: ConfigRecord({"describe": check.describe()[:500]}),
    })
    return Message(content=content, reply_to=msg)


def code_counts(msg: Message, context: Context) -> Message:
    """Feature agreement (MEDS sites): patients per code, and per code with a numeric value, only
    for codes seen in at least k of this site's patients; k is the site file's ``min_subjects``
    raised to the site's patient floor (``min-patients``, set by the deployed site's policy). No
    other number, no code below k, no patient's id, time or value is sent."""
    from fedmeta.common.data.meds.source import shared_counts
    from fedmeta.sitecore.data import meds_site_for_node

    cfg = experiment_of(msg)
    site = meds_site_for_node(context.node_config, cfg)
    shared = shared_counts(site, policy_floor=int(str(context.node_config.get("min-patients", 1))))
    content = RecordDict({
        K.SITE: ConfigRecord({"name": shared.name}),
        K.METRICS: MetricRecord({K.MIN_SUBJECTS: shared.min_subjects}),
        K.CODE_COUNTS: MetricRecord(dict(shared.codes)),
        K.NUMERIC_COUNTS: MetricRecord(dict(shared.numeric)),
    })
    return Message(content=content, reply_to=msg)


def query(msg: Message, context: Context) -> Message:
    """A QUERY is the feature agreement's count request (phase ``counts``) or the greeting."""
    config = msg.content[K.CONFIG]
    if str(config.get(K.PHASE, K.HELLO)) == K.COUNTS:
        return code_counts(msg, context)
    return hello(msg, context)


def _threads(cfg: ExperimentConfig) -> None:
    import torch

    if torch.get_num_threads() != cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)


def train(msg: Message, context: Context) -> Message:
    cfg = experiment_of(msg)
    _threads(cfg)
    site = site_of(context, cfg)
    server_round = count_in(msg.content.config_records[K.CONFIG], K.ROUND)
    state = receive_state(msg.content.array_records[K.ARRAYS], msg.content.config_records[K.CONFIG], context)
    update = train_update(cfg, spec_of(site), site, state, rng=site_rng(cfg, site.name, server_round))
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
    content = RecordDict({
        K.UPDATE: record,
        K.ENCODING: encoding,
        K.SITE: ConfigRecord({"name": site.name}),
        K.METRICS: MetricRecord(metrics),
    })
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    cfg = experiment_of(msg)
    _threads(cfg)
    site = site_of(context, cfg)
    state = arrays_from_record(msg.content.array_records[K.ARRAYS])
    result = evaluate_site(cfg, spec_of(site), site, state, rng=site_rng(cfg, site.name, 0, "eval"))
    # the site's patient floor (deployment: node.yaml's policy); a simulation has none
    floor = int(str(context.node_config.get("min-patients", 1)))
    outcomes = site.outcomes if isinstance(site, TabularSite) else ()
    released, _ = released_metrics(result, outcomes, floor=floor)
    metrics: MetricValues = {k: (int(v) if is_count(k) else float(v)) for k, v in released.items()}
    content = RecordDict({K.SITE: ConfigRecord({"name": site.name}), K.METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def make_client_app(mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp with fedmeta's handlers; ``mods`` wrap every message (e.g. DP, auditing)."""
    client_app = ClientApp(mods=list(mods))
    client_app.query()(query)
    client_app.train()(train)
    client_app.evaluate()(evaluate)
    return client_app


app = make_client_app()
