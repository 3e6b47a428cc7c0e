"""The coordinator's side of the federated logistic regression (``algorithm: glm``).

Each round sends every training site the coefficients ``β = (w, b)`` (its own intercept with
``glm.site_intercept``) in a TRAIN message of phase ``glm``; each site answers with the sums of
its rows' gradient and Hessian at ``β`` (:func:`fedmeta.common.glm.site_sums`), released only
when they rest on at least its ``min_patients`` rows. The coordinator takes the Newton step on
the total (:func:`fedmeta.common.glm.newton_step`) until the Newton decrement falls below
``glm.tol`` or ``glm.max_steps`` steps were taken. Every site must answer every step: the fit is the
pooled fit only over the same rows each time, so a missing or refusing site stops the run with
its name.

The fitted coefficients become the linear model's θ: class 0's logit 0, class 1's ``xᵀw + b``
(``b`` the common intercept; with site intercepts each site's own ``b + u_s`` is in the summary,
and each site's adaptation policy may refit its intercept).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import MessageType

from fedmeta.common.config import ExperimentConfig
from fedmeta.common.errors import FedmetaError
from fedmeta.common.glm import GlmState, GlmSums, newton_step
from fedmeta.common.params import NDArrays
from fedmeta.protocol import keys as K
from fedmeta.protocol.errors import refusal_reason
from fedmeta.protocol.records import (
    arrays_from_record,
    count_in,
    number_in,
    payload_bytes,
    record_from_arrays,
)

log = logging.getLogger(__name__)

Exchange = Callable[[list[Message]], Any]  # messages -> an Outcome with .replies and .missing


def glm_theta(state: GlmState, reference: Mapping[str, np.ndarray]) -> NDArrays:
    """The linear model's θ (names and shapes of ``reference``: a ``(2, d)`` weight and a ``(2,)``
    bias) holding ``state``: class 1's logit minus class 0's is ``xᵀw + b`` (the common
    intercept; a site's own offset is for its adaptation to refit)."""
    b = state.b
    out: NDArrays = {}
    for name, ref in reference.items():
        value = np.zeros(ref.shape, dtype=np.float32)
        if ref.ndim == 2:
            value[1] = state.w
        else:
            value[1] = b
        out[name] = value
    return out


def read_sums(msg: Message, site: str, d: int) -> GlmSums:
    """A site's reply as sums; a :class:`FedmetaError` names the site and what is wrong."""
    if msg.has_error():
        why = refusal_reason(msg.error)
        raise FedmetaError(f"glm: site {site} declined: {why}")
    content = msg.content
    if K.SUMS not in content.array_records or K.METRICS not in content.metric_records:
        raise FedmetaError(f"glm: site {site}: reply lacks the '{K.SUMS}' arrays or the 'metrics' record")
    try:
        arrays = arrays_from_record(content.array_records[K.SUMS])
        metrics = content.metric_records[K.METRICS]
        n = count_in(metrics, K.NUM_EXAMPLES)
        loss = number_in(metrics, K.LOSS_SUM)
    except ValueError as e:
        raise FedmetaError(f"glm: site {site}: {e}") from None
    if set(arrays) != {"gradient", "hessian"}:
        raise FedmetaError(f"glm: site {site}: sums hold {sorted(arrays)}, expected gradient and hessian")
    g = np.asarray(arrays["gradient"], dtype=np.float64)
    h = np.asarray(arrays["hessian"], dtype=np.float64)
    if g.shape != (d + 1,) or h.shape != (d + 1, d + 1):
        raise FedmetaError(f"glm: site {site}: sums of shape {g.shape}/{h.shape}, expected "
                           f"({d + 1},)/({d + 1}, {d + 1})")
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(h)) and np.isfinite(loss)):
        raise FedmetaError(f"glm: site {site}: sums are not finite")
    if not np.allclose(h, h.T, rtol=1e-9, atol=1e-9) or np.linalg.eigvalsh((h + h.T) / 2).min() < -1e-6 * max(1.0, n):
        raise FedmetaError(f"glm: site {site}: the Hessian is not symmetric positive semi-definite")
    # the Hessian's intercept entry is sum p(1 - p) <= n/4: a larger one is not a sum over n rows
    if h[d, d] > n / 4 + 1e-9:
        raise FedmetaError(f"glm: site {site}: the Hessian does not fit {n} rows")
    return GlmSums(gradient=g, hessian=(h + h.T) / 2, loss=loss, n=n, events=0)


def fit_glm(cfg: ExperimentConfig, sites: Mapping[int, str], reference: Mapping[str, np.ndarray],
            exchange: Exchange, *, on_round: Callable[[dict[str, Any]], None],
            say: Callable[[str], None]) -> tuple[NDArrays, dict[str, Any]]:
    """Fit ``cfg``'s GLM over the training ``sites`` (node -> name); returns θ and the summary's
    ``glm`` entry. ``exchange`` delivers a round's messages; ``on_round`` receives each round's
    line for ``rounds.jsonl``."""
    holdout = set(cfg.data.holdout)
    nodes = sorted((n for n, s in sites.items() if s not in holdout), key=lambda n: (sites[n], n))
    if len(nodes) < cfg.federation.min_nodes:
        raise FedmetaError(f"glm: {len(nodes)} training site(s), fewer than federation.min_nodes = "
                           f"{cfg.federation.min_nodes}")
    d = next(v.shape[1] for v in reference.values() if v.ndim == 2)
    g = cfg.glm
    state = GlmState.zeros(d, len(nodes) if g.site_intercept else 0)
    experiment = cfg.to_json()
    converged = False
    server_round = 0
    traffic = {"bytes_up": 0, "bytes_down": 0}
    for server_round in range(1, g.max_steps + 1):
        t0 = time.monotonic()
        messages = []
        bytes_down = 0
        for i, node in enumerate(nodes):
            arrays = record_from_arrays({"beta": state.site_beta(i)})
            bytes_down += payload_bytes(arrays)
            config = ConfigRecord({K.EXPERIMENT: experiment, K.ROUND: server_round, K.PHASE: K.GLM})
            messages.append(Message(content=RecordDict({K.CONFIG: config, K.ARRAYS: arrays}),
                                    message_type=MessageType.TRAIN, dst_node_id=node,
                                    ttl=float(cfg.federation.timeout_s)))
        outcome = exchange(messages)
        by_node = {m.metadata.src_node_id: m for m in outcome.replies}
        missing = [sites[n] for n in nodes if n not in by_node]
        if missing:
            raise FedmetaError(f"glm: no reply from {', '.join(missing)} in round {server_round}; "
                               "the fit needs every training site at every step")
        sums = [read_sums(by_node[n], sites[n], d) for n in nodes]
        rows = np.array([s.n for s in sums], dtype=np.float64)
        step = newton_step(state, sums, l2=g.l2)
        state = step.state
        bytes_up = sum(payload_bytes(by_node[n].content.array_records[K.SUMS]) for n in nodes)
        mean_loss = float(sum(s.loss for s in sums) / rows.sum())
        line = {"round": server_round, "sampled": [sites[n] for n in nodes],
                "accepted": [sites[n] for n in nodes], "rejected": {},
                "objective": step.objective, "mean_log_loss": mean_loss,
                "newton_decrement": step.decrement, "num_examples": int(rows.sum()),
                "bytes_up": int(bytes_up), "bytes_down": int(bytes_down),
                "wall_s": round(time.monotonic() - t0, 4)}
        on_round(line)
        traffic["bytes_up"] += int(bytes_up)
        traffic["bytes_down"] += int(bytes_down)
        say(f"round {server_round}: Newton step on {int(rows.sum())} patients at "
            f"{len(nodes)} sites, mean log-loss {mean_loss:.4f}, decrement {step.decrement:.2e}")
        if step.decrement < g.tol:
            converged = True
            break
    if not converged:
        log.warning("glm: not converged after %d Newton steps (decrement above %g)", g.max_steps, g.tol)
    theta = glm_theta(state, reference)
    summary = {"glm": {
        "l2": g.l2, "site_intercept": g.site_intercept, "converged": converged,
        "newton_steps": server_round, **traffic, "coefficients": [float(v) for v in state.w],
        "intercept": state.b,
        "site_intercepts": ({sites[n]: float(b) for n, b in zip(nodes, state.site_intercepts(), strict=True)}
                            if g.site_intercept else {}),
    }}
    return theta, summary
