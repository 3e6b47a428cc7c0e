"""Federated evaluation: every site adapts the current state and scores its own test split.

Sites are the unit of the consortium's summary: :func:`summary_mean` is the unweighted mean over
sites of each metric (each hospital counts once, whatever its size), skipping metrics a site
could not define (e.g. AUROC on a one-class test split).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Message, MetricRecord

from fedmeta.protocol import keys as K
from fedmeta.protocol.errors import refusal_reason
from fedmeta.protocol.records import count_in, number_in

log = logging.getLogger(__name__)

METRICS = ("accuracy", "auroc", "loss")
PHASES = ("before", "after")
#: ``adapt_scope`` codes of the replies (:data:`fedmeta.sitecore.evaluate.SCOPE_CODES`).
SCOPES = {0: "none", 1: "intercept", 2: "last", 3: "all", 4: "fixed", 5: "support"}
_COUNTS = ("n_train", "n_test", "events", "adapt_steps", "draws", "withheld")


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _phase_means(entries: list[Mapping]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for phase in PHASES:
        keys = [k for k in dict.fromkeys(k for e in entries for k in e.get(phase, {})) if "." not in k]
        # the three headline metrics first, in a fixed order
        keys = [m for m in METRICS if m in keys] + [k for k in keys if k not in METRICS]
        out[phase] = {m: _nanmean([e.get(phase, {}).get(m, float("nan")) for e in entries]) for m in keys}
    return out


def summary_mean(per_site: Mapping[str, Mapping]) -> dict[str, Any]:
    """Unweighted mean over sites (each hospital counts once) of every metric, skipping
    undefined values; ``outcomes``: the same per outcome for multi-outcome sites."""
    out: dict[str, Any] = _phase_means(list(per_site.values()))
    names = list(dict.fromkeys(o for s in per_site.values() for o in s.get("outcomes", {})))
    if names:
        out["outcomes"] = {o: _phase_means([s["outcomes"][o] for s in per_site.values()
                                            if o in s.get("outcomes", {})]) for o in names}
    return out


def parse_evaluation(m: MetricRecord, outcomes: Sequence[str] = ()) -> dict[str, Any]:
    """One site's evaluation from its flat reply (the keys of
    :func:`fedmeta.sitecore.evaluate.released_metrics`): ``before``/``after`` metrics, counts,
    ``adapt_scope``, ``spread`` over draws, ``reliability`` bins the site released, and
    ``outcomes`` (named by the experiment's outcomes, never by the reply). Unknown keys are
    ignored; a malformed value raises ``ValueError``."""
    entries: dict[str, dict[str, Any]] = {}

    def entry(prefix: str) -> dict[str, Any]:
        return entries.setdefault(prefix, {"before": {}, "after": {}})

    for key in m:
        prefix, rest = "", key
        head, _, tail = key.partition(".")
        if len(head) > 1 and head[0] == "o" and head[1:].isdigit():
            prefix, rest = head, tail
        e = entry(prefix)
        parts = rest.split(".")
        if parts[0] in PHASES and len(parts) >= 2:
            e[parts[0]][".".join(parts[1:])] = number_in(m, key)
        elif parts[0] == "spread" and len(parts) >= 3 and parts[1] in PHASES:
            e.setdefault("spread", {}).setdefault(parts[1], {})[".".join(parts[2:])] = number_in(m, key)
        elif parts[0] == "rel" and len(parts) == 4 and parts[1] in PHASES and parts[2].isdigit():
            bins = e.setdefault("reliability", {}).setdefault(parts[1], {})
            bins.setdefault(int(parts[2]), {})[parts[3]] = number_in(m, key)
        elif rest in _COUNTS:
            e[rest] = count_in(m, key)
        elif rest == "adapt_scope":
            e[rest] = SCOPES.get(count_in(m, key), "unknown")
    for e in entries.values():
        for phase, bins in e.get("reliability", {}).items():
            e["reliability"][phase] = [{"bin": b, **v} for b, v in sorted(bins.items())]
    out = entries.get("", {"before": {}, "after": {}})
    if not out["before"] or "n_test" not in out:
        raise ValueError("the reply holds no evaluation")
    named = {}
    for prefix, e in entries.items():
        if prefix:
            j = int(prefix[1:])
            if j < len(outcomes):
                named[outcomes[j]] = e
    if named and outcomes:
        out["outcomes"] = {outcomes[0]: {k: v for k, v in out.items() if k != "reliability"}, **named}
    return out


def read_evaluate_replies(replies: Iterable[Message], nodes: Mapping[int, str],
                          declined: dict[str, str] | None = None, outcomes: Sequence[str] = ()) -> dict[str, dict]:
    """Per-site evaluations (:func:`parse_evaluation`) from evaluate replies, named by ``nodes``
    (node id -> site name, never by the reply); sites that answered with an error go into
    ``declined`` (site -> the category, or the rule of a policy refusal)."""
    out: dict[str, dict] = {}
    for msg in replies:
        node = msg.metadata.src_node_id
        site = nodes.get(node, str(node))
        if msg.has_error():
            why = refusal_reason(msg.error)
            log.warning("evaluation declined by %s: %s", site, why)
            if declined is not None:
                declined[site] = why
            continue
        try:
            out[site] = parse_evaluation(msg.content.metric_records[K.METRICS], outcomes)
        except (KeyError, ValueError, TypeError) as e:
            log.warning("evaluation reply of %s is malformed (%s); left out", site, e)
            continue
    return out


Exchange = Callable[[list[Message]], Iterable[Message]]


def federated_evaluation(
    exchange: Exchange, messages: list[Message], nodes: Mapping[int, str], holdout: Iterable[str],
    declined: dict[str, str] | None = None, outcomes: Sequence[str] = (),
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Send the evaluation ``messages`` and split the replies into training and held-out sites."""
    per_site = read_evaluate_replies(exchange(messages), nodes, declined, outcomes)
    held_out = set(holdout)
    training = {k: v for k, v in per_site.items() if k not in held_out}
    return training, {k: v for k, v in per_site.items() if k in held_out}
