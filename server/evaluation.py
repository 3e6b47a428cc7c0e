"""Federated evaluation: every site adapts the current state and scores its own test split.

Sites are the unit of the consortium's summary: :func:`summary_mean` is the unweighted mean over
sites of each metric (each hospital counts once, whatever its size), skipping metrics a site
could not define (e.g. AUROC on a one-class test split).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import Message

from fedmeta.protocol import keys as K
from fedmeta.protocol.errors import describe
from fedmeta.protocol.records import count_in, number_in

log = logging.getLogger(__name__)

METRICS = ("accuracy", "auroc", "loss")
PHASES = ("before", "after")


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summary_mean(per_site: Mapping[str, Mapping]) -> dict[str, dict[str, float]]:
    """Unweighted mean over sites (each hospital counts once), skipping undefined values."""
    return {
        phase: {m: _nanmean([s[phase][m] for s in per_site.values()]) for m in METRICS}
        for phase in PHASES
    }


def read_evaluate_replies(replies: Iterable[Message], nodes: Mapping[int, str],
                          declined: dict[str, str] | None = None) -> dict[str, dict]:
    """Per-site ``{"before": {...}, "after": {...}, "n_train", "n_test"}`` from evaluate replies,
    named by ``nodes`` (node id -> site name, never by the reply); sites that answered with an
    error go into ``declined`` (site -> the category, or the rule of a policy refusal)."""
    out: dict[str, dict] = {}
    for msg in replies:
        node = msg.metadata.src_node_id
        site = nodes.get(node, str(node))
        if msg.has_error():
            text = msg.error.reason or ""
            why = text[:200] if text.startswith("policy refusal") else describe(msg.error.code)
            log.warning("evaluation declined by %s: %s", site, why)
            if declined is not None:
                declined[site] = why
            continue
        try:
            m = msg.content[K.METRICS]
            entry: dict = {"before": {}, "after": {}}
            for key in m:
                phase, _, metric = key.partition(".")
                if phase in PHASES:
                    entry[phase][metric] = number_in(m, key)
            entry["n_train"] = count_in(m, K.N_TRAIN)
            entry["n_test"] = count_in(m, K.N_TEST)
            if K.ADAPT_STEPS in m:
                entry["adapt_steps"] = count_in(m, K.ADAPT_STEPS)
        except (KeyError, ValueError) as e:
            log.warning("evaluation reply of %s is malformed (%s); left out", site, e)
            continue
        out[site] = entry
    return out


Exchange = Callable[[list[Message]], Iterable[Message]]


def federated_evaluation(
    exchange: Exchange, messages: list[Message], nodes: Mapping[int, str], holdout: Iterable[str],
    declined: dict[str, str] | None = None,
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Send the evaluation ``messages`` and split the replies into training and held-out sites."""
    per_site = read_evaluate_replies(exchange(messages), nodes, declined)
    held_out = set(holdout)
    training = {k: v for k, v in per_site.items() if k not in held_out}
    return training, {k: v for k, v in per_site.items() if k in held_out}
