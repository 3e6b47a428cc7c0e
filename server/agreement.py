"""Federated feature agreement: the MEDS sites' shared vocabulary, chosen from their counts.

Before the greeting of a run on MEDS sites (``data.source: meds`` or ``synth-meds``), the
coordinator sends every node a QUERY with phase ``counts`` and the experiment. Each site answers
with its k and, for each code seen in at least k of its labelled patients, how many patients have
it and how many have it with a numeric value (:func:`fedmeta.common.data.meds.source.shared_counts`);
nothing else. The coordinator checks every reply (counts are integers >= the site's k, numeric
counts within the code counts), leaves out a site that answered with an error, a malformed reply
or no code at all, sets aside the counts of sites held out of training (``data.holdout``: new
hospitals adopt the consortium's layout), and chooses the vocabulary with
:func:`~fedmeta.common.data.meds.vocabulary.choose_vocabulary` (``data.meds``: ``min_sites``,
``top_n``, ``windows``, ``aggregations``). The driver then puts the vocabulary into the experiment
(``data.meds.vocabulary`` and ``fingerprint``), which every later message carries, and records
it in the run folder (``vocabulary.json``) so that a resumed run reuses it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid

from fedmeta.common.config import ExperimentConfig
from fedmeta.common.data.meds.source import agreement_settings
from fedmeta.common.data.meds.vocabulary import Vocabulary, choose_vocabulary
from fedmeta.common.errors import DataError, FedmetaError
from fedmeta.protocol import keys as K
from fedmeta.protocol.errors import refusal_reason
from fedmeta.protocol.records import count_in
from fedmeta.server.exchange import Waiting, exchange
from fedmeta.server.handshake import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteShare:
    """What one site shared: its k and how many codes (and codes with numeric values) it sent."""

    min_subjects: int
    codes: int
    numeric_codes: int


@dataclass(frozen=True)
class Agreement:
    """The chosen vocabulary, what each contributing site shared (by site name), and the nodes
    left out (node id -> why)."""

    vocabulary: Vocabulary
    shares: dict[str, SiteShare] = field(default_factory=dict)
    excluded: dict[int, str] = field(default_factory=dict)
    min_sites: int = 1

    def record(self) -> dict[str, Any]:
        """The run folder's and summary's account of the agreement (no count is recorded)."""
        v = self.vocabulary
        return {
            "fingerprint": v.fingerprint(), "width": v.width, "codes": len(v.codes),
            "numeric_codes": len(v.numeric_codes), "windows": list(v.windows),
            "min_sites": self.min_sites,
            "sites": {s: {"min_subjects": sh.min_subjects, "codes_shared": sh.codes,
                          "numeric_codes_shared": sh.numeric_codes}
                      for s, sh in sorted(self.shares.items())},
        }


def _counts(reply: Message, name: str, k: int) -> dict[str, int]:
    """A counts record as code -> count, refused unless every count is an integer >= k."""
    record = reply.content.metric_records.get(name)
    if record is None:
        raise ValueError(f"no {name!r} record")
    out: dict[str, int] = {}
    for code, n in record.items():
        if not isinstance(code, str) or not code:
            raise ValueError(f"{name}: a code is not a non-empty string")
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"{name}: code {code!r} has a count that is not an integer")
        if n < k:
            raise ValueError(f"{name}: code {code!r} has count {n} below the site's own k = {k}")
        out[code] = n
    return out


def _read_reply(reply: Message) -> tuple[str, int, dict[str, int], dict[str, int]]:
    """(name, k, code counts, numeric counts) of a counts reply; ValueError if malformed."""
    try:
        name = str(reply.content[K.SITE]["name"])
        k = count_in(reply.content.metric_records[K.METRICS], K.MIN_SUBJECTS)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"no site name or k ({e})") from None
    if k < 1:
        raise ValueError(f"k = {k}")
    codes = _counts(reply, K.CODE_COUNTS, k)
    numeric = _counts(reply, K.NUMERIC_COUNTS, k)
    beyond = [c for c, n in numeric.items() if n > codes.get(c, 0)]
    if beyond:
        raise ValueError(f"code {beyond[0]!r} has more patients with values than patients")
    return name, k, codes, numeric


def agree_vocabulary(grid: Grid, cfg: ExperimentConfig, nodes: list[int], progress: Progress,
                     registered: Mapping[int, str] | None = None) -> Agreement:
    """Ask ``nodes`` for their thresholded code counts and choose the vocabulary (module
    docstring). ``registered`` (deployment) names the nodes, else their answers do. Raises
    :class:`FedmetaError` when fewer than ``federation.min_nodes`` sites shared counts, or no
    code is reported by enough sites."""
    config = ConfigRecord({K.PHASE: K.COUNTS, K.EXPERIMENT: cfg.to_json()})
    msgs = [Message(content=RecordDict({K.CONFIG: config}), message_type=MessageType.QUERY,
                    dst_node_id=n, ttl=cfg.federation.timeout_s) for n in nodes]
    progress(f"feature agreement: asking {len(msgs)} site(s) for their code counts "
             "(codes seen in at least k patients only)")
    outcome = exchange(grid, msgs, Waiting(timeout_s=cfg.federation.timeout_s, quorum=len(msgs)))
    excluded: dict[int, str] = {}
    shares: dict[str, SiteShare] = {}
    codes: list[dict[str, int]] = []
    numeric: list[dict[str, int]] = []
    seen: dict[str, int] = {}
    labels = {n: f"site {name}" for n, name in (registered or {}).items()}
    for reply in sorted(outcome.replies, key=lambda r: r.metadata.src_node_id):
        node = reply.metadata.src_node_id
        label = labels.get(node, f"node {node}")
        if reply.has_error():
            why = refusal_reason(reply.error)
            excluded[node] = f"no code counts: {why}"
            progress(f"{label} sent no code counts ({why}); left out of the run")
            continue
        try:
            answered, k, site_codes, site_numeric = _read_reply(reply)
        except ValueError as e:
            excluded[node] = f"malformed code counts ({e})"[:200]
            progress(f"{label} sent malformed code counts ({e}); left out of the run")
            continue
        name = registered[node] if registered is not None else answered
        if name in seen:
            raise FedmetaError(f"two nodes claim the same site {name!r}; check node configs")
        seen[name] = node
        labels[node] = f"site {name}"
        if not site_codes:
            excluded[node] = f"no code is seen in at least its k = {k} patients"
            progress(f"site {name}: no code is seen in at least its k = {k} patients, so it shares "
                     "no counts; left out of the run")
            continue
        if name in cfg.data.holdout:  # a new hospital: it joins the agreed layout, not the agreement
            progress(f"site {name} is held out of training: its counts are not used")
            continue
        shares[name] = SiteShare(k, len(site_codes), len(site_numeric))
        codes.append(site_codes)
        numeric.append(site_numeric)
        progress(f"site {name}: counts of {len(site_codes)} codes (k = {k})")
    for node in outcome.missing:
        label = labels.get(node, f"node {node}")
        progress(f"{label} did not answer the count request ({outcome.ended}); it may still "
                 "join with the agreed vocabulary")
    need = cfg.federation.min_nodes
    if len(codes) < need:
        left_out = "; ".join(f"{labels.get(n, f'node {n}')}: {why}" for n, why in sorted(excluded.items()))
        raise FedmetaError(
            f"feature agreement: {len(codes)} site(s) shared code counts, fewer than "
            f"federation.min_nodes = {need}" + (f" (left out: {left_out})" if left_out else ""))
    min_sites = cfg.data.meds.min_sites_of(len(codes))
    if min_sites > len(codes):
        raise FedmetaError(
            f"data.meds.min_sites = {cfg.data.meds.min_sites}: a code must be reported by "
            f"{min_sites} sites, but only {len(codes)} shared code counts")
    windows, aggregations = agreement_settings(cfg.data)
    try:
        vocab = choose_vocabulary(codes, min_sites=min_sites, top_n=cfg.data.meds.top_n,
                                  numeric_counts=numeric, windows=windows, aggregations=aggregations)
    except DataError as e:
        raise FedmetaError(f"feature agreement: {e}") from None
    progress(f"feature agreement: {len(vocab.codes)} codes reported by at least {min_sites} of "
             f"{len(codes)} sites, {vocab.width} features; vocabulary {vocab.fingerprint()[:12]}")
    return Agreement(vocab, shares, excluded, min_sites)
