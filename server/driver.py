"""The coordinator's run: handshake, rounds, checkpoints, final evaluation and the run folder.

``run_experiment`` drives a strategy through Flower's :class:`~flwr.serverapp.Grid` (simulation or
deployment alike) and writes, into the run folder:

- ``config.json``: the effective experiment configuration;
- ``rounds.jsonl``: one line per round (sites sampled/accepted/rejected, losses, bytes, time);
- ``checkpoint.safetensors``: θ, the outer optimiser's state, the round and the RNG state, after
  every round, so ``resume=True`` continues exactly where the run stopped;
- ``final.safetensors`` and ``summary.json`` at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid

from fedmeta.common import params as P
from fedmeta.common.config import ExperimentConfig
from fedmeta.common.data.registry import data_spec
from fedmeta.common.errors import ConfigError, FedmetaError
from fedmeta.common.experiment import initial_parameters
from fedmeta.server import audit as audit_log
from fedmeta.server.registry import make_strategy
from fedmeta.server.strategy import FedMetaStrategy, read_evaluate_replies, summary_mean
from fedmeta.server.wire import payload_bytes, record_from_arrays

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def _wait_for_nodes(grid: Grid, n: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise FedmetaError(
                f"only {len(nodes)} site(s) connected within {timeout_s:.0f} s; need {n} "
                "(federation.min_nodes)"
            )
        time.sleep(1.0)


def handshake(grid: Grid, cfg: ExperimentConfig, expected: int, progress: Progress,
              known: dict[int, str] | None = None) -> dict[int, str]:
    """Ask every connected site not in ``known`` for its name (a QUERY message); returns
    ``node_id -> site`` for all of them (``known`` included). With ``known`` it does not wait."""
    known = dict(known or {})
    nodes = (_wait_for_nodes(grid, expected, cfg.federation.timeout_s) if not known
             else sorted(n for n in grid.get_node_ids() if n not in known))
    if known and not nodes:
        return known
    content = RecordDict({"config": ConfigRecord({"phase": "hello", "experiment": cfg.to_json()})})
    msgs = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    names: dict[int, str] = {}
    for reply in grid.send_and_receive(msgs, timeout=cfg.federation.timeout_s):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d failed the handshake: %s", node, reply.error.reason)
            continue
        names[node] = str(reply.content["site"]["name"])
    # A site reconnecting under a new node id replaces its old one.
    known = {n: s for n, s in known.items() if s not in set(names.values())}
    dupes = {s for s in names.values() if list(names.values()).count(s) > 1}
    if dupes:
        raise FedmetaError(f"two nodes claim the same site {sorted(dupes)[0]!r}; check node configs")
    if names:
        progress(f"{len(names)} site(s) joined: {', '.join(sorted(names.values()))}")
    return known | names


class RunFolder:
    """Paths of one run's outputs and the helpers that write them atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "config.json"
        self.rounds = root / "rounds.jsonl"
        self.checkpoint = root / "checkpoint.safetensors"
        self.final = root / "final.safetensors"
        self.summary = root / "summary.json"

    def write_json(self, path: Path, data: Any) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_nan_to_none(data), indent=2, sort_keys=True, default=_json_default,
                                  allow_nan=False) + "\n")
        tmp.replace(path)

    def read_rounds(self, upto: int) -> list[dict]:
        if not self.rounds.exists():
            return []
        lines = [json.loads(line) for line in self.rounds.read_text().splitlines() if line.strip()]
        return [r for r in lines if r["round"] <= upto]


def _nan_to_none(o: Any) -> Any:
    """Strict JSON: an undefined metric (e.g. AUROC of a one-class split) becomes null."""
    if isinstance(o, float) and not np.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_nan_to_none(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_run_config(run_dir: Path, overrides: list[str]) -> ExperimentConfig:
    """The effective config saved in a run folder, with ``key=value`` overrides (e.g. rounds)."""
    from fedmeta.common.config import load_config

    path = run_dir / "config.json"
    if not path.exists():
        raise ConfigError(f"{run_dir}: not a fedmeta run folder (no config.json)")
    return load_config(None, overrides, base=json.loads(path.read_text()))


def save_checkpoint(folder: RunFolder, strategy: FedMetaStrategy, theta: P.NDArrays, server_round: int,
                    totals: dict[str, float]) -> None:
    arrays = {f"theta/{k}": v for k, v in theta.items()}
    arrays.update({f"opt/{k}": v for k, v in strategy.optimizer.state_arrays().items()})
    arrays.update({f"extra/{k}": v for k, v in strategy.state_arrays().items()})
    meta = {
        "round": server_round,
        "rng": strategy.rng.bit_generator.state,
        "totals": totals,
        "algorithm": strategy.cfg.algorithm,
    }
    P.save(folder.checkpoint, arrays, meta)


def load_checkpoint(folder: RunFolder) -> tuple[P.NDArrays, P.NDArrays, P.NDArrays, dict[str, Any]]:
    arrays, meta = P.load(folder.checkpoint)
    theta = {k[6:]: v for k, v in arrays.items() if k.startswith("theta/")}
    opt = {k[4:]: v for k, v in arrays.items() if k.startswith("opt/")}
    extra = {k[6:]: v for k, v in arrays.items() if k.startswith("extra/")}
    return theta, opt, extra, meta


def federated_evaluation(grid: Grid, strategy: FedMetaStrategy, cfg: ExperimentConfig, arrays: Any,
                         server_round: int) -> tuple[dict[str, dict], dict[str, dict], int]:
    """Every site adapts the current state and scores its test split: per-site results of the
    training sites and of the held-out ones, and the payload bytes the broadcast sent."""
    msgs = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord({"experiment": cfg.to_json()}), grid))
    per_site = read_evaluate_replies(grid.send_and_receive(msgs, timeout=cfg.federation.timeout_s),
                                     strategy.node_names)
    held_out = set(cfg.data.holdout)
    training = {k: v for k, v in per_site.items() if k not in held_out}
    holdout = {k: v for k, v in per_site.items() if k in held_out}
    return training, holdout, payload_bytes(arrays) * len(msgs)


def run_experiment(
    grid: Grid,
    cfg: ExperimentConfig,
    out_dir: Path,
    *,
    expected_nodes: int | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the federated experiment ``cfg``; returns the summary written to disk.

    ``stop_after`` ends the run after that round without the final evaluation, as an interrupted
    run would (used to test resuming).
    """
    say = progress or (lambda text: log.info("%s", text))
    t0 = time.monotonic()
    folder = RunFolder(out_dir)
    spec = data_spec(cfg.data)
    theta = initial_parameters(cfg, spec)
    log.info("effective configuration: %s", cfg.to_json())
    folder.write_json(folder.config, cfg.to_dict())

    names = handshake(grid, cfg, expected_nodes or cfg.federation.min_nodes, say)
    audit, run_id = _start_audit(grid, cfg, names)
    strategy = make_strategy(cfg, theta, node_names=names, rng=np.random.default_rng(cfg.seed))
    strategy.summary()
    theta = strategy.theta()  # θ plus any learned state (Meta-SGD's rates)
    first_round = 1
    totals = {"bytes_up": 0.0, "bytes_down": 0.0, "wall_s": 0.0}
    history: list[dict] = []
    if resume and folder.checkpoint.exists():
        saved, opt_state, extra, meta = load_checkpoint(folder)
        if set(saved) != set(theta):
            raise ConfigError(f"{folder.checkpoint}: parameters do not match the configured model")
        theta = {k: saved[k] for k in theta}  # the model's order, not the file's
        if meta.get("algorithm") != cfg.algorithm:
            raise ConfigError(f"{folder.checkpoint}: saved by algorithm {meta.get('algorithm')}, not {cfg.algorithm}")
        strategy.restore(theta, opt_state, extra)
        strategy.rng.bit_generator.state = meta["rng"]
        totals = {k: float(v) for k, v in meta["totals"].items()}
        t0 -= totals["wall_s"]  # wall time counts the interrupted part too
        first_round = int(meta["round"]) + 1
        history = folder.read_rounds(first_round - 1)
        say(f"resuming {out_dir} after round {first_round - 1}")
        if audit is not None:
            audit.checkpoint_resumed(run_id=run_id, round=first_round - 1)
    folder.rounds.write_text("".join(json.dumps(r) + "\n" for r in history))

    arrays = record_from_arrays(strategy.global_arrays(theta))
    train_config = ConfigRecord({"experiment": cfg.to_json()})
    for server_round in range(first_round, cfg.rounds + 1):
        t_round = time.monotonic()
        if set(grid.get_node_ids()) - set(strategy.node_names):  # sites that connected late
            strategy.node_names = handshake(grid, cfg, 0, say, known=strategy.node_names)
        messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
        replies = list(grid.send_and_receive(messages, timeout=cfg.federation.timeout_s))
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
            theta = strategy.theta()
        rec = strategy.last
        assert rec is not None
        if cfg.privacy.dp:
            from fedmeta.common.privacy import epsilon

            # Sites are sampled as a fixed-size subset, not by Poisson sampling, so no privacy
            # amplification by subsampling is claimed: ε is that of every round taking part.
            rec.epsilon = epsilon(rounds=server_round, noise_multiplier=cfg.privacy.noise_multiplier,
                                  delta=cfg.privacy.delta)
        if audit is not None:
            audit.round_outcome(
                run_id=run_id, round=server_round,
                sampled_nodes=[m.metadata.dst_node_id for m in messages], node_names=strategy.node_names,
                accepted_sites=rec.accepted, rejected_sites=rec.rejected,
            )
        totals["bytes_up"] += rec.bytes_up
        totals["bytes_down"] += rec.bytes_down
        line = asdict(rec) | {"wall_s": round(time.monotonic() - t_round, 4), "applied": new_arrays is not None}
        interim = None
        if cfg.eval.every and server_round % cfg.eval.every == 0 and server_round < cfg.rounds:
            sites, _, sent = federated_evaluation(grid, strategy, cfg, arrays, server_round)
            totals["bytes_down"] += sent
            interim = {"sites": sites, "mean": summary_mean(sites) if sites else {}}
            line["eval"] = interim
        with folder.rounds.open("a") as f:
            f.write(json.dumps(_nan_to_none(line), default=_json_default, allow_nan=False) + "\n")
        totals["wall_s"] = time.monotonic() - t0
        save_checkpoint(folder, strategy, theta, server_round, totals)
        say(
            f"round {server_round}/{cfg.rounds}: {len(rec.accepted)}/{len(rec.sampled)} sites, "
            f"query loss {rec.query_loss_before:.4f} -> {rec.query_loss_after:.4f} after adaptation"
            + (f", rejected {sorted(rec.rejected)}" if rec.rejected else "")
            + (f", DP ε = {rec.epsilon:.2f} at δ = {cfg.privacy.delta:g}" if rec.epsilon is not None else "")
        )
        if interim is not None and interim["mean"]:
            say(f"round {server_round}: evaluation, mean accuracy after adaptation "
                f"{interim['mean']['after']['accuracy']:.3f}")
        if stop_after is not None and server_round >= stop_after:
            if audit is not None:
                audit.run_finished(run_id=run_id, status="stopped", rounds_completed=server_round)
            return {"stopped_after": server_round}

    per_site, holdout, sent = federated_evaluation(grid, strategy, cfg, arrays, cfg.rounds)
    totals["bytes_down"] += sent
    if not per_site:
        raise FedmetaError("no site returned an evaluation; see the log for their errors")
    P.save(folder.final, theta, {"algorithm": cfg.algorithm, "rounds": cfg.rounds, "seed": cfg.seed,
                                 "config": cfg.to_json()})
    summary = {
        "algorithm": cfg.algorithm,
        "rounds": cfg.rounds,
        "seed": cfg.seed,
        "wall_s": round(time.monotonic() - t0, 3),
        "config": cfg.to_dict(),
        "sites": dict(sorted(per_site.items())),
        "mean": summary_mean(per_site),
        "comm": {"bytes_up": int(totals["bytes_up"]), "bytes_down": int(totals["bytes_down"])},
        "params": {"count": int(sum(v.size for v in theta.values())), "file": folder.final.name},
    }
    if cfg.privacy.dp:
        from fedmeta.common.privacy import epsilon

        summary["privacy"] = {
            "epsilon": epsilon(rounds=cfg.rounds, noise_multiplier=cfg.privacy.noise_multiplier,
                               delta=cfg.privacy.delta),
            "delta": cfg.privacy.delta, "clip": cfg.privacy.clip,
            "noise_multiplier": cfg.privacy.noise_multiplier, "adjacency": "site-level",
        }
    if holdout:
        summary["holdout"] = {"sites": dict(sorted(holdout.items())), "mean": summary_mean(holdout)}
    summary.update(strategy.summary_extra())
    folder.write_json(folder.summary, summary)
    if audit is not None:
        audit.run_finished(run_id=run_id, status="completed", rounds_completed=cfg.rounds)
    return summary


def _start_audit(
    grid: Grid, cfg: ExperimentConfig, names: dict[int, str]
) -> tuple[audit_log.AuditLog | None, int]:
    """The coordinator's audit log (deployment only: ``$FEDMETA_AUDIT_LOG``) and the run id."""
    audit = audit_log.from_env()
    if audit is None:
        return None, 0
    try:
        run_id = int(grid.run.run_id)
    except (AttributeError, NotImplementedError):
        run_id = 0
    audit.run_started(
        run_id=run_id, algorithm=cfg.algorithm, rounds=cfg.rounds,
        config_sha256=hashlib.sha256(cfg.to_json().encode()).hexdigest(), nodes=sorted(names),
    )
    return audit, run_id

