"""The coordinator's side of every algorithm on Flower's Message API.

One :class:`FedMetaStrategy` serves every algorithm: it reads the algorithm's record
(:mod:`fedmeta.common.algorithms`) for the direction its outer optimiser takes and for the extra
state it learns. Each round it

1. samples sites and builds their messages (:meth:`FedMetaStrategy.configure_train`, which
   returns a :class:`TrainPlan`),
2. checks every reply (:func:`fedmeta.server.aggregation.validate_update`; a reply may not claim
   more examples than its algorithm allows for the site), leaves out a site the response check
   flags (:class:`fedmeta.server.aggregation.ResponseCheck`, whose state the checkpoint carries),
   aggregates the others by their example counts, no site above ``validation.max_weight_share``
   of the total, and applies the outer optimiser (:meth:`FedMetaStrategy.aggregate_train`, which
   takes the plan back and returns a :class:`RoundResult`).

Results are values passed on, not attributes another object reaches into. The strategy mirrors
Flower's ``configure_*``/``aggregate_*`` split but is driven by fedmeta's own round loop
(:mod:`fedmeta.server.driver`), which adds the handshake, audit, checkpoints and the run folder.

Reply layout (train): ``update`` (ArrayRecord, parameter-shaped), ``metrics`` (MetricRecord with
``num-examples`` and summed losses), ``encoding`` (ConfigRecord with the method).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import MessageType

from fedmeta.common import algorithms
from fedmeta.common.compression import checksum, decode, encode
from fedmeta.common.config import ExperimentConfig
from fedmeta.common.data.registry import DataSpec
from fedmeta.common.errors import DeltaError
from fedmeta.common.params import NDArrays, l2_norm
from fedmeta.protocol import keys as K
from fedmeta.protocol.errors import refusal_reason
from fedmeta.protocol.records import arrays_from_record, payload_bytes, record_from_arrays
from fedmeta.server.aggregation import ResponseCheck, aggregate, cap_weight_shares, validate_update
from fedmeta.server.outer import OuterOptimizer

log = logging.getLogger(__name__)


@dataclass
class RoundLog:
    """What one round did, for ``rounds.jsonl`` and the audit log (counts and names, no data)."""

    round: int
    sampled: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    #: accepted sites whose update the response check left out of this round's aggregate
    excluded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    num_examples: int = 0
    query_loss_before: float = float("nan")
    query_loss_after: float = float("nan")
    update_norm: float = float("nan")
    bytes_down: int = 0
    bytes_up: int = 0
    epsilon: float | None = None


@dataclass(frozen=True)
class TrainPlan:
    """A round's messages and what the coordinator expects back: ``nodes`` maps each sampled
    node to its site name; ``log`` is filled in by :meth:`FedMetaStrategy.aggregate_train`."""

    round: int
    messages: list[Message]
    nodes: dict[int, str]
    log: RoundLog


@dataclass(frozen=True)
class RoundResult:
    """The outcome of one round: the new broadcast state (None when too few sites replied
    validly and θ was left unchanged) and the round's log."""

    state: NDArrays | None
    log: RoundLog

    @property
    def applied(self) -> bool:
        return self.state is not None


def state_from_checkpoint(arrays: Mapping[str, np.ndarray]) -> NDArrays:
    """The broadcast state held in a checkpoint written from :meth:`FedMetaStrategy.checkpoint`."""
    return {k[len("theta/"):]: v for k, v in arrays.items() if k.startswith("theta/")}


def decode_update(record: ArrayRecord, encoding: ConfigRecord | None, *, site: str,
                  reference: Mapping[str, np.ndarray]) -> NDArrays:
    """A reply's arrays decoded to float32 arrays shaped like ``reference``."""
    try:
        arrays = arrays_from_record(record)
    except (ValueError, TypeError) as e:
        raise DeltaError(f"site {site}: update arrays cannot be deserialised: {e}") from e
    method = str(encoding["method"]) if encoding and "method" in encoding else "none"
    return decode(arrays, method, reference, source=f"site {site}")


class FedMetaStrategy:
    """The outer update ``state ← OuterOpt(state, direction(aggregate))`` of one experiment.

    ``state`` is θ plus the algorithm's extra state (what is broadcast). ``spec`` is the data's
    shape; ``seed`` seeds the site sampling.
    """

    def __init__(self, cfg: ExperimentConfig, spec: DataSpec, theta: NDArrays) -> None:
        self.cfg = cfg
        self.spec = spec
        self.algorithm = algorithms.get(cfg.algorithm)
        state = self.algorithm.initial_state(theta, cfg)
        self._optimizer = OuterOptimizer(state, cfg.outer)
        self._reference = {k: np.asarray(v) for k, v in state.items()}
        self._rng = np.random.default_rng(cfg.seed)
        self._held: dict[int, NDArrays] = {}  # node -> the state it holds (downlink deltas)
        self._ttl = float(cfg.federation.timeout_s)  # a round's messages expire with the round
        self._response = ResponseCheck(allowance=cfg.validation.response_allowance,
                                       threshold=cfg.validation.response_threshold)

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> NDArrays:
        """The broadcast state: θ plus the algorithm's extra state."""
        return self._optimizer.params()

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the broadcast state (the federated GLM's fitted θ, computed outside the
        outer optimiser); names and shapes must be the model's."""
        from fedmeta.common.errors import ConfigError

        if {k: np.shape(v) for k, v in state.items()} != {k: v.shape for k, v in self._reference.items()}:
            raise ConfigError("the state does not match the configured model's parameters")
        self._optimizer = OuterOptimizer({k: np.asarray(state[k]) for k in self._reference}, self.cfg.outer)

    def theta(self) -> NDArrays:
        """θ alone (what ``final.safetensors`` holds)."""
        return self.algorithm.split(self.state())[0]

    def checkpoint(self) -> tuple[NDArrays, dict[str, Any]]:
        """Arrays and metadata that let :meth:`restore` continue exactly from here."""
        arrays = {f"theta/{k}": v for k, v in self.state().items()}
        arrays.update({f"opt/{k}": v for k, v in self._optimizer.state_arrays().items()})
        arrays.update(self._response.arrays("response/"))
        return arrays, {"rng": self._rng.bit_generator.state, "algorithm": self.cfg.algorithm,
                        "response": self._response.meta()}

    def restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], *,
                source: str) -> None:
        """Continue from :meth:`checkpoint`'s output (θ, optimiser state, sampling RNG, the
        response check's history)."""
        from fedmeta.common.errors import ConfigError

        if meta.get("algorithm") != self.cfg.algorithm:
            raise ConfigError(f"{source}: saved by algorithm {meta.get('algorithm')}, not {self.cfg.algorithm}")
        saved = state_from_checkpoint(arrays)
        if set(saved) != set(self._reference):
            raise ConfigError(f"{source}: parameters do not match the configured model")
        state = {k: saved[k] for k in self._reference}  # the model's order, not the file's
        self._optimizer = OuterOptimizer(state, self.cfg.outer)
        self._optimizer.load_state_arrays({k[4:]: v for k, v in arrays.items() if k.startswith("opt/")})
        self._rng.bit_generator.state = meta["rng"]
        self._response.load(arrays, meta.get("response", []), "response/")
        self._held.clear()

    def summary_extra(self) -> dict[str, object]:
        """Algorithm-specific entries for ``summary.json`` (Meta-SGD: its learned rates)."""
        return self.algorithm.summary(self.algorithm.split(self.state())[1])

    def describe(self) -> None:
        log.info(
            "%s: outer %s lr=%g, sampling fraction %.2f (min %d), aggregation %s",
            self.algorithm.title, self.cfg.outer.optimizer, self.cfg.outer.lr,
            self.cfg.federation.fraction, self.cfg.federation.min_nodes,
            self.cfg.validation.aggregation,
        )

    # -- one training round ---------------------------------------------------------------------
    def sample(self, nodes: Mapping[int, str]) -> list[int]:
        """A seeded sample of ``fraction`` of the training nodes (at least ``min_nodes``), ordered
        by site; held-out sites (``data.holdout``) never train."""
        holdout = set(self.cfg.data.holdout)
        eligible = sorted((n for n, s in nodes.items() if s not in holdout), key=lambda n: (nodes[n], n))
        k = max(int(round(len(eligible) * self.cfg.federation.fraction)), self.cfg.federation.min_nodes)
        k = min(k, len(eligible))
        if k == len(eligible):
            return eligible
        picked = self._rng.choice(len(eligible), size=k, replace=False)
        return [eligible[i] for i in sorted(picked)]

    def configure_train(self, server_round: int, nodes: Mapping[int, str]) -> TrainPlan:
        """Sample sites from ``nodes`` (node id -> site name) and build their train messages."""
        sampled = self.sample(nodes)
        record = RoundLog(round=server_round, sampled=[nodes[n] for n in sampled])
        config = self._config(server_round, K.TRAIN)
        comp = self.cfg.compression
        state = self.state()
        messages: list[Message] = []
        if comp.downlink == "full" or comp.method == "none":
            arrays = record_from_arrays(state)
            record.bytes_down = payload_bytes(arrays) * len(sampled)
            messages = _messages(arrays, config, sampled, MessageType.TRAIN, self._ttl)
        else:
            for node in sampled:
                arrays, node_config = self._downlink(node, state, config)
                record.bytes_down += payload_bytes(arrays)
                messages.extend(_messages(arrays, node_config, [node], MessageType.TRAIN, self._ttl))
        return TrainPlan(server_round, messages, {n: nodes[n] for n in sampled}, record)

    def _config(self, server_round: int, phase: str) -> ConfigRecord:
        return ConfigRecord({K.EXPERIMENT: self.cfg.to_json(), K.ROUND: server_round, K.PHASE: phase})

    def _downlink(self, node: int, state: NDArrays, cfg: ConfigRecord) -> tuple[ArrayRecord, ConfigRecord]:
        """What to send ``node``: the full state the first time, afterwards the encoded change
        from what it holds. The server tracks what the node will hold after decoding, so encoding
        error never accumulates: the next change includes it."""
        comp = self.cfg.compression
        out = ConfigRecord(dict(cfg))
        held = self._held.get(node)
        if held is None:
            self._held[node] = {k: v.copy() for k, v in state.items()}
            out[K.DOWN] = "full"
            return record_from_arrays(state), out
        change = {k: state[k] - held[k] for k in state}
        encoded, _ = encode(change, comp.method, topk_fraction=comp.topk_fraction)
        decoded = decode(encoded, comp.method, held)
        out[K.DOWN] = "delta"
        out[K.DOWN_METHOD] = comp.method
        out[K.DOWN_BASE] = checksum(held)
        self._held[node] = {k: (held[k] + decoded[k]).astype(np.float32) for k in held}
        return record_from_arrays(encoded), out

    def aggregate_train(self, plan: TrainPlan, replies: Iterable[Message], *,
                        declared: Mapping[int, int] | None = None) -> RoundResult:
        """Validate, aggregate and apply the outer update; invalid replies are logged and skipped.

        ``declared`` (node -> the training rows it declared at the handshake) bounds what a reply
        may claim as its weight: more than its algorithm allows is rejected.
        """
        record = plan.log
        updates: list[NDArrays] = []
        weights: list[float] = []
        sums = {K.NUM_EXAMPLES: 0.0, K.LOSS_BEFORE: 0.0, K.LOSS_AFTER: 0.0, K.N_QUERY: 0.0}
        before_from_all = True  # θ's loss before adaptation is reported only with engine.before_stats
        # A fixed order (by site) makes the float sums, and so the run, reproducible.
        for msg in sorted(replies, key=lambda m: plan.nodes.get(m.metadata.src_node_id, "")):
            node = msg.metadata.src_node_id
            site = plan.nodes.get(node, str(node))
            try:
                if node not in plan.nodes:
                    raise DeltaError(f"node {node}: replied without being sampled this round")
                update, metrics = self._read_train_reply(msg, site, (declared or {}).get(node))
                record.bytes_up += payload_bytes(msg.content.array_records[K.UPDATE])
                norm = validate_update(update, self._reference, max_norm=self.cfg.validation.max_norm,
                                       source=f"site {site}")
            except DeltaError as e:
                self._held.pop(node, None)  # resynchronise this node with a full state next time
                record.rejected[site] = str(e)
                log.warning("round %d: rejected the reply of %s: %s", plan.round, site, e)
                continue
            updates.append(update)
            # Under DP every site counts once: example-count weights would let one site's data
            # move the aggregate by more than the clipping bound.
            weights.append(1.0 if self.cfg.privacy.dp else metrics[K.NUM_EXAMPLES])
            record.accepted.append(site)
            record.site_metrics[site] = {
                "num_examples": metrics[K.NUM_EXAMPLES],
                "query_loss_after": (metrics[K.LOSS_AFTER] / metrics[K.N_QUERY]
                                     if metrics.get(K.N_QUERY, 0) > 0 else float("nan")),
                "update_norm": norm,
            }
            before_from_all &= K.LOSS_BEFORE in metrics
            for key in sums:
                sums[key] += float(metrics.get(key, 0.0))
        if len(updates) < self.cfg.federation.min_nodes:
            log.warning(
                "round %d: %d valid replies, fewer than federation.min_nodes = %d; θ unchanged",
                plan.round, len(updates), self.cfg.federation.min_nodes,
            )
            return RoundResult(None, record)
        v = self.cfg.validation
        if v.response_check:
            cosines = self._response.observe(self.state(), {
                site: self.algorithm.direction(u) for site, u in zip(record.accepted, updates, strict=True)})
            scores = self._response.scores()
            for site in record.accepted:  # aggregate numbers about the update, not about patients
                record.site_metrics[site]["response"] = cosines.get(site, float("nan"))
                record.site_metrics[site]["response_score"] = scores.get(site, 0.0)
            record.excluded = self._response.excluded(record.accepted)
            if record.excluded:
                log.warning("round %d: left %s out of the aggregate: their updates react to θ's "
                            "movement unlike the other sites' (validation.response_check)",
                            plan.round, record.excluded)
                keep = [i for i, s in enumerate(record.accepted) if s not in record.excluded]
                updates, weights = [updates[i] for i in keep], [weights[i] for i in keep]
        if v.aggregation == "mean":
            weights = self._cap_weights(plan.round, record, weights)
        aggregated = aggregate(updates, weights, rule=v.aggregation, trim=v.trim, clip_norm=v.clip_norm,
                               relative_clip=v.relative_clip)
        new_state = self._optimizer.step(self.algorithm.direction(aggregated))
        record.num_examples = int(sums[K.NUM_EXAMPLES])
        if sums[K.N_QUERY] > 0:  # sites under DP send no losses
            if before_from_all:
                record.query_loss_before = sums[K.LOSS_BEFORE] / sums[K.N_QUERY]
            record.query_loss_after = sums[K.LOSS_AFTER] / sums[K.N_QUERY]
        record.update_norm = l2_norm(aggregated)
        return RoundResult(new_state, record)

    def _cap_weights(self, server_round: int, record: RoundLog, weights: list[float]) -> list[float]:
        """The aggregate's weights, none above ``validation.max_weight_share`` of their sum; each
        kept site's share goes into its ``site_metrics`` (``weight_share``)."""
        kept = [s for s in record.accepted if s not in record.excluded]
        capped = cap_weight_shares(weights, self.cfg.validation.max_weight_share)
        cut = [s for s, a, b in zip(kept, weights, capped, strict=True) if b < a]
        if cut:
            log.warning("round %d: the weight of %s cut to %.3g of the aggregate "
                        "(validation.max_weight_share)", server_round, cut, self.cfg.validation.max_weight_share)
        total = sum(capped)
        for site, w in zip(kept, capped, strict=True):
            record.site_metrics[site]["weight_share"] = w / total
        return capped

    def _read_train_reply(self, msg: Message, site: str, declared: int | None) -> tuple[NDArrays, dict[str, float]]:
        if msg.has_error():
            why = refusal_reason(msg.error)
            raise DeltaError(f"site {site} declined: {why}")
        content = msg.content
        if K.UPDATE not in content.array_records or K.METRICS not in content.metric_records:
            raise DeltaError(f"site {site}: reply lacks the 'update' arrays or the 'metrics' record")
        metrics = {k: float(v) for k, v in content[K.METRICS].items() if isinstance(v, int | float)}
        claimed = metrics.get(K.NUM_EXAMPLES, 0)
        if not claimed > 0:
            raise DeltaError(f"site {site}: reply has no positive 'num-examples'")
        if declared is not None:
            bound = self.algorithm.max_examples(self.cfg, self.spec, declared)
            if claimed > bound:
                raise DeltaError(
                    f"site {site}: claims {claimed:g} examples, more than the {bound} its "
                    f"{self.algorithm.name} round can use (declared {declared} training rows)"
                )
        encoding = content.config_records.get(K.ENCODING)
        update = decode_update(content.array_records[K.UPDATE], encoding, site=site,
                               reference=self._reference)
        return update, metrics

    # -- evaluation ------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, nodes: Mapping[int, str]) -> list[Message]:
        """Every node adapts the current state and scores its own test split."""
        order = sorted(nodes, key=lambda n: (nodes[n], n))
        return _messages(record_from_arrays(self.state()), self._config(server_round, K.EVALUATE),
                         order, MessageType.EVALUATE, float(self.cfg.federation.eval_timeout_s))


def _messages(arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int], message_type: str,
              ttl: float) -> list[Message]:
    content = RecordDict({K.ARRAYS: arrays, K.CONFIG: config})
    return [Message(content=content, message_type=message_type, dst_node_id=n, ttl=ttl)
            for n in node_ids]
