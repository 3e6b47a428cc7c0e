"""Shared glue of fedmeta's server strategies on Flower's Message API.

A :class:`FedMetaStrategy` samples sites, sends them θ and the experiment, checks every reply
(:func:`fedmeta.common.aggregation.validate_update`), aggregates the valid ones by their example
counts and hands the result to the outer optimiser. Subclasses (one per algorithm, one per file)
only say how an aggregated update becomes a pseudo-gradient for the outer optimiser.

Reply layout (train): ``update`` (ArrayRecord, parameter-shaped), ``metrics`` (MetricRecord with
``num-examples`` and summed losses), ``site`` (ConfigRecord with the site's name).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmeta.common.aggregation import aggregate, validate_update
from fedmeta.common.compression import checksum, decode, encode
from fedmeta.common.config import ExperimentConfig
from fedmeta.common.errors import DeltaError
from fedmeta.common.outer import OuterOptimizer
from fedmeta.common.params import NDArrays, l2_norm
from fedmeta.server.wire import arrays_from_record, decode_update, payload_bytes, record_from_arrays

log = logging.getLogger(__name__)


@dataclass
class RoundLog:
    """What one round did, for ``rounds.jsonl`` and the audit log (counts and names, no data)."""

    round: int
    sampled: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    num_examples: int = 0
    query_loss_before: float = float("nan")
    query_loss_after: float = float("nan")
    update_norm: float = float("nan")
    bytes_down: int = 0
    bytes_up: int = 0
    epsilon: float | None = None


class FedMetaStrategy(Strategy):
    """Base strategy: the outer update ``θ ← OuterOpt(θ, pseudo_gradient(aggregate))``.

    ``node_names`` maps Flower node ids to site names (learned from the handshake), so logs and
    per-site curves name hospitals rather than random node ids.
    """

    #: Name shown in logs and summaries (the paper is cited in each subclass's docstring).
    name = "base"
    #: ``delta``: sites send ``θ_i − θ`` (pseudo-gradient ``−Δ̄``); ``gradient``: a meta-gradient.
    update_kind = "delta"

    def __init__(
        self,
        cfg: ExperimentConfig,
        theta: NDArrays,
        *,
        node_names: dict[int, str],
        rng: np.random.Generator,
        on_reject: Callable[[int, str, str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.node_names = dict(node_names)
        self.rng = rng
        self.optimizer = OuterOptimizer(theta, cfg.outer)
        self.reference = {k: np.asarray(v) for k, v in theta.items()}
        self.on_reject = on_reject
        self.last: RoundLog | None = None
        self.held: dict[int, NDArrays] = {}  # node -> the state it holds (downlink deltas)

    # -- to be specialised -------------------------------------------------------------------
    def pseudo_gradient(self, aggregated: NDArrays) -> NDArrays:
        """Direction handed to the outer optimiser (``-Δ̄`` for deltas, ``ḡ`` for gradients)."""
        if self.update_kind == "delta":
            return {k: -v for k, v in aggregated.items()}
        return dict(aggregated)

    def theta(self) -> NDArrays:
        """The current global parameters."""
        return self.optimizer.params()

    def restore(self, theta: NDArrays, opt_state: NDArrays, extra: NDArrays) -> None:
        """Continue from a checkpoint: θ, the outer optimiser's state and :meth:`state_arrays`."""
        self.optimizer = OuterOptimizer(theta, self.cfg.outer)
        self.optimizer.load_state_arrays(opt_state)

    def state_arrays(self) -> NDArrays:
        """Strategy state beyond θ and the optimiser, saved in checkpoints (none by default)."""
        return {}

    def summary_extra(self) -> dict:
        """Algorithm-specific entries for ``summary.json`` (none by default)."""
        return {}

    def reference_update(self) -> NDArrays:
        """Names, shapes and dtypes a valid reply must have (θ's, by default)."""
        return self.reference

    # -- Flower Strategy interface --------------------------------------------------------------
    def summary(self) -> None:
        log.info(
            "%s: outer %s lr=%g, sampling fraction %.2f (min %d), aggregation %s",
            self.name, self.cfg.outer.optimizer, self.cfg.outer.lr, self.cfg.federation.fraction,
            self.cfg.federation.min_nodes, self.cfg.validation.aggregation,
        )

    def sample(self, node_ids: Iterable[int]) -> list[int]:
        """A seeded sample of ``fraction`` of the training nodes (at least ``min_nodes``), ordered
        by site; held-out sites (``data.holdout``) never train."""
        holdout = set(self.cfg.data.holdout)
        nodes = sorted((n for n in node_ids if self.node_names.get(n) not in holdout),
                       key=lambda n: (self.node_names.get(n, ""), n))
        k = max(int(round(len(nodes) * self.cfg.federation.fraction)), self.cfg.federation.min_nodes)
        k = min(k, len(nodes))
        if k == len(nodes):
            return nodes
        picked = self.rng.choice(len(nodes), size=k, replace=False)
        return [nodes[i] for i in sorted(picked)]

    def _messages(
        self, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int], message_type: str
    ) -> list[Message]:
        content = RecordDict({"arrays": arrays, "config": config})
        return [Message(content=content, message_type=message_type, dst_node_id=n) for n in node_ids]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        node_ids = self.sample(grid.get_node_ids())
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = server_round
        cfg["phase"] = "train"
        self.last = RoundLog(round=server_round, sampled=[self.node_names.get(n, str(n)) for n in node_ids])
        comp = self.cfg.compression
        if comp.downlink == "full" or comp.method == "none":
            self.last.bytes_down = payload_bytes(arrays) * len(node_ids)
            return self._messages(arrays, cfg, node_ids, MessageType.TRAIN)
        state = arrays_from_record(arrays)
        messages = []
        for node in node_ids:
            record, node_cfg = self._downlink(node, state, cfg)
            self.last.bytes_down += payload_bytes(record)
            messages.extend(self._messages(record, node_cfg, [node], MessageType.TRAIN))
        return messages

    def _downlink(self, node: int, state: NDArrays, cfg: ConfigRecord) -> tuple[ArrayRecord, ConfigRecord]:
        """What to send ``node``: the full state the first time, afterwards the encoded change
        from what it holds. The server tracks what the node will hold after decoding, so encoding
        error never accumulates: the next change includes it."""
        comp = self.cfg.compression
        out = ConfigRecord(dict(cfg))
        held = self.held.get(node)
        if held is None:
            self.held[node] = {k: v.copy() for k, v in state.items()}
            out["down"] = "full"
            return record_from_arrays(state), out
        change = {k: state[k] - held[k] for k in state}
        encoded, _ = encode(change, comp.method, topk_fraction=comp.topk_fraction)
        decoded = decode(encoded, comp.method, held)
        out["down"] = "delta"
        out["down-method"] = comp.method
        out["down-base"] = checksum(held)
        self.held[node] = {k: (held[k] + decoded[k]).astype(np.float32) for k in held}
        return record_from_arrays(encoded), out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, aggregate and apply the outer update; invalid replies are logged and skipped."""
        record = self.last if self.last and self.last.round == server_round else RoundLog(server_round)
        self.last = record
        updates: list[NDArrays] = []
        weights: list[float] = []
        sums = {"num-examples": 0.0, "query-loss-before": 0.0, "query-loss-after": 0.0, "n-query": 0.0}
        reference = self.reference_update()
        # A fixed order (by site) makes the float sums, and so the run, reproducible.
        for msg in sorted(replies, key=lambda m: self.node_names.get(m.metadata.src_node_id, "")):
            node = msg.metadata.src_node_id
            site = self.node_names.get(node, str(node))
            try:
                update, metrics = self._read_train_reply(msg, site)
                record.bytes_up += payload_bytes(msg.content["update"])
                norm = validate_update(update, reference, max_norm=self.cfg.validation.max_norm, source=f"site {site}")
            except DeltaError as e:
                self.held.pop(node, None)  # resynchronise this node with a full θ next time
                record.rejected[site] = str(e)
                log.warning("round %d: rejected the reply of %s: %s", server_round, site, e)
                if self.on_reject:
                    self.on_reject(server_round, site, str(e))
                continue
            updates.append(update)
            # Under DP every site counts once: example-count weights would let one site's data
            # move the aggregate by more than the clipping bound.
            weights.append(1.0 if self.cfg.privacy.dp else metrics["num-examples"])
            record.accepted.append(site)
            record.site_metrics[site] = {
                "num_examples": metrics["num-examples"],
                "query_loss_after": (metrics["query-loss-after"] / metrics["n-query"]
                                     if metrics.get("n-query", 0) > 0 else float("nan")),
                "update_norm": norm,
            }
            for key in sums:
                sums[key] += float(metrics.get(key, 0.0))
        if len(updates) < self.cfg.federation.min_nodes:
            log.warning(
                "round %d: %d valid replies, fewer than federation.min_nodes = %d; θ unchanged",
                server_round, len(updates), self.cfg.federation.min_nodes,
            )
            return None, None
        v = self.cfg.validation
        aggregated = aggregate(updates, weights, rule=v.aggregation, trim=v.trim, clip_norm=v.clip_norm)
        new_theta = self.optimizer.step(self.pseudo_gradient(aggregated))
        record.num_examples = int(sums["num-examples"])
        if sums["n-query"] > 0:  # sites under DP send no losses
            record.query_loss_before = sums["query-loss-before"] / sums["n-query"]
            record.query_loss_after = sums["query-loss-after"] / sums["n-query"]
        record.update_norm = l2_norm(aggregated)
        metrics_out = MetricRecord({
            "num-examples": record.num_examples,
            "query-loss-before": record.query_loss_before,
            "query-loss-after": record.query_loss_after,
        })
        return record_from_arrays(self.global_arrays(new_theta)), metrics_out

    def global_arrays(self, theta: NDArrays) -> NDArrays:
        """What is broadcast to sites: θ itself (Meta-SGD adds its learned rates)."""
        return theta

    def _read_train_reply(self, msg: Message, site: str) -> tuple[NDArrays, dict[str, float]]:
        if msg.has_error():
            raise DeltaError(f"site {site}: the client failed: {msg.error.reason}")
        content = msg.content
        if "update" not in content.array_records or "metrics" not in content.metric_records:
            raise DeltaError(f"site {site}: reply lacks the 'update' arrays or the 'metrics' record")
        metrics = {k: float(v) for k, v in content["metrics"].items() if isinstance(v, int | float)}
        if not metrics.get("num-examples", 0) > 0:
            raise DeltaError(f"site {site}: reply has no positive 'num-examples'")
        meta = content.config_records.get("encoding")
        update = decode_update(content["update"], meta, site=site, reference=self.reference_update())
        return update, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        node_ids = sorted(grid.get_node_ids(), key=lambda n: (self.node_names.get(n, ""), n))
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = server_round
        cfg["phase"] = "evaluate"
        return self._messages(arrays, cfg, node_ids, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Unweighted mean over sites of each after-adaptation metric (sites are the unit)."""
        per_site = read_evaluate_replies(replies, self.node_names)
        if not per_site:
            return None
        return MetricRecord({f"after-{k}": v for k, v in summary_mean(per_site)["after"].items()})


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summary_mean(per_site: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Unweighted mean over sites (each hospital counts once), skipping undefined values."""
    return {
        phase: {m: _nanmean([s[phase][m] for s in per_site.values()]) for m in ("accuracy", "auroc", "loss")}
        for phase in ("before", "after")
    }


def read_evaluate_replies(replies: Iterable[Message], node_names: dict[int, str]) -> dict[str, dict]:
    """Per-site ``{"before": {...}, "after": {...}, "n_train", "n_test"}`` from evaluate replies."""
    out: dict[str, dict] = {}
    for msg in replies:
        node = msg.metadata.src_node_id
        site = node_names.get(node, str(node))
        if msg.has_error():
            log.warning("evaluation failed at %s: %s", site, msg.error.reason)
            continue
        if "site" in msg.content.config_records:
            site = str(msg.content["site"]["name"])
        m = msg.content["metrics"]
        entry: dict = {"before": {}, "after": {}}
        for key, value in m.items():
            phase, _, metric = key.partition(".")
            if phase in ("before", "after"):
                entry[phase][metric] = float(value)
        entry["n_train"] = int(m["n-train"])
        entry["n_test"] = int(m["n-test"])
        out[site] = entry
    return out

