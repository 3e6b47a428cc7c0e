"""A hospital's Flower ClientApp: unpack the coordinator's message, compute locally, reply.

Which site a node is comes from its node config: ``site-config`` (path of the site's YAML, for a
real hospital), ``site`` (a site name of the experiment's data source) or ``partition-id``
(simulation: the i-th site, training sites first, then held-out ones). The reply holds parameter-shaped arrays and aggregate
numbers only; :mod:`fedmeta.client.task` computes them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedmeta.client import task
from fedmeta.client.wire import arrays_from_record, encode_reply, receive_state
from fedmeta.common.config import ExperimentConfig, config_from_dict
from fedmeta.common.data.base import Site
from fedmeta.common.data.registry import data_spec, load_site, simulation_sites
from fedmeta.common.errors import ConfigError
from fedmeta.common.experiment import site_rng
from fedmeta.common.privacy import privatize_arrays

log = logging.getLogger(__name__)

_SITES: dict[str, Site] = {}


def experiment_of(msg: Message) -> ExperimentConfig:
    record = msg.content["config"]
    return config_from_dict(json.loads(str(record["experiment"])), where="<experiment from coordinator>")


def site_of(context: Context, cfg: ExperimentConfig) -> Site:
    """Load (once per process) the rows of the site this node is; nothing else is read."""
    nc = context.node_config
    key = json.dumps({"node": {k: str(v) for k, v in nc.items()}, "data": cfg.to_dict()["data"]}, sort_keys=True)
    if key in _SITES:
        return _SITES[key]
    if "site-config" in nc:
        from fedmeta.client.site_config import load_local_site

        site = load_local_site(str(nc["site-config"]), data=cfg.data, tasks=cfg.tasks)
    elif "site" in nc:
        site = load_site(cfg.data, str(nc["site"]))
    elif "partition-id" in nc:
        names = simulation_sites(cfg.data)
        pid = int(nc["partition-id"])
        if not 0 <= pid < len(names):
            raise ConfigError(f"partition-id {pid} out of range: the experiment has {len(names)} sites")
        site = load_site(cfg.data, names[pid])
    else:
        raise ConfigError("node config names no site: set site-config=PATH, site=NAME or partition-id=N")
    _SITES[key] = site
    return site


def hello(msg: Message, context: Context) -> Message:
    """Handshake: the site's name and split sizes (counts only)."""
    cfg = experiment_of(msg)
    site = site_of(context, cfg)
    content = RecordDict({
        "site": ConfigRecord({"name": site.name}),
        "metrics": MetricRecord({"n-train": site.n_train, "n-test": site.n_test}),
    })
    return Message(content=content, reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    cfg = experiment_of(msg)
    site = site_of(context, cfg)
    server_round = int(msg.content["config"]["server-round"])
    theta = receive_state(msg.content["arrays"], msg.content["config"], context)
    update = task.train_update(cfg, data_spec(cfg.data), site, theta, rng=site_rng(cfg, site.name, server_round))
    arrays = update.arrays
    s = update.stats
    metrics: dict[str, int | float] = {"num-examples": int(update.num_examples), "n-tasks": int(s.n_tasks)}
    if cfg.privacy.dp:
        # Clip and noise the update here, on the site (local DP); losses computed from patients
        # are not covered by the mechanism, so they are not sent.
        arrays, clip = privatize_arrays(arrays, clip=cfg.privacy.clip, noise_multiplier=cfg.privacy.noise_multiplier)
        log.info("DP: update norm %.4g clipped to %.4g", clip.norm, cfg.privacy.clip)
    else:
        metrics.update({
            "n-query": int(s.n_query),
            "query-loss-before": float(s.query_loss_before),
            "query-loss-after": float(s.query_loss_after),
        })
    record, encoding = encode_reply(arrays, cfg, context)
    content = RecordDict({
        "update": record,
        "encoding": encoding,
        "site": ConfigRecord({"name": site.name}),
        "metrics": MetricRecord(metrics),
    })
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    cfg = experiment_of(msg)
    site = site_of(context, cfg)
    theta = arrays_from_record(msg.content["arrays"])
    result = task.evaluate_site(cfg, data_spec(cfg.data), site, theta, rng=site_rng(cfg, site.name, 0, "eval"))
    metrics: dict[str, float | int] = {"n-train": int(result["n_train"]), "n-test": int(result["n_test"])}
    for phase in ("before", "after"):
        for key, value in result[phase].items():
            metrics[f"{phase}.{key}"] = float(value)
    content = RecordDict({"site": ConfigRecord({"name": site.name}), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def make_client_app(mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp with fedmeta's handlers; ``mods`` wrap every message (e.g. DP, auditing)."""
    client_app = ClientApp(mods=list(mods))
    client_app.query()(hello)
    client_app.train()(train)
    client_app.evaluate()(evaluate)
    return client_app


app = make_client_app()
