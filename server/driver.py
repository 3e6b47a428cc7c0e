"""The coordinator's run: handshake, rounds, checkpoints and the final evaluation.

``run_experiment`` drives a :class:`~fedmeta.server.strategy.FedMetaStrategy` through Flower's
:class:`~flwr.serverapp.Grid` (simulation or deployment alike): each round's plan and result are
values passed from one step to the next; the run folder (:mod:`fedmeta.server.runfolder`)
receives ``config.json``, ``rounds.jsonl``, a checkpoint after every round (``resume=True``
continues exactly where a run stopped), ``final.safetensors`` and ``summary.json``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedmeta.common.config import AUTO, ExperimentConfig
from fedmeta.common.data.registry import data_spec
from fedmeta.common.errors import ConfigError, FedmetaError
from fedmeta.common.experiment import initial_parameters
from fedmeta.protocol.records import payload_bytes, record_from_arrays
from fedmeta.server import audit as audit_log
from fedmeta.server.evaluation import federated_evaluation, summary_mean
from fedmeta.server.exchange import Outcome, Waiting, _push_pull, exchange
from fedmeta.server.handshake import (
    Progress,
    Sites,
    greet,
    hello_messages,
    read_greetings,
    wait_for_nodes,
)
from fedmeta.server.identity import NodeIdentity, Registry, admitted_names
from fedmeta.server.runfolder import RunFolder
from fedmeta.server.strategy import FedMetaStrategy, RoundResult, TrainPlan

log = logging.getLogger(__name__)

__all__ = ["run_experiment"]

#: How long a greeting to a node that missed a round lives (it is not waited for on a deployment).
PROBE_TTL_S = 15.0


def _epsilon(cfg: ExperimentConfig, rounds: int) -> float:
    from fedmeta.common.privacy import epsilon

    # Sites are sampled as a fixed-size subset, not by Poisson sampling, so no privacy
    # amplification by subsampling is claimed: ε is that of every round taking part.
    return epsilon(rounds=rounds, noise_multiplier=cfg.privacy.noise_multiplier, delta=cfg.privacy.delta)


class _Run:
    """One run's moving parts: the grid, the strategy, the sites, the folder and the audit log.

    On MEDS sites without an agreed vocabulary the strategy (θ's width) exists only once the
    sites agreed on their features (:meth:`agree`, at :meth:`start`)."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig, folder: RunFolder, say: Progress) -> None:
        self.grid = grid
        self.cfg = cfg
        self.folder = folder
        self.say = say
        self.spec = data_spec(cfg.data)
        self._strategy: FedMetaStrategy | None = None
        if not self.spec.needs_agreement:
            self._strategy = FedMetaStrategy(cfg, self.spec, initial_parameters(cfg, self.spec))
        self.agreement: dict[str, Any] | None = None
        self.sites = Sites()
        self.refused: dict[int, tuple[str, str]] = {}
        self.deployed = Registry.from_env() is not None
        self.audit: audit_log.AuditLog | None = None
        self.run_id = 0
        self.totals = {"bytes_up": 0.0, "bytes_down": 0.0, "wall_s": 0.0}
        self.declined: dict[str, str] = {}
        #: Nodes that missed a round: not sampled until they answer a greeting again.
        self.unresponsive: set[int] = set()
        #: Greetings pushed to unresponsive nodes and not answered yet: message id -> (node, when).
        self.probes: dict[str, tuple[int, float]] = {}

    @property
    def strategy(self) -> FedMetaStrategy:
        if self._strategy is None:
            raise FedmetaError("the sites have not agreed on their features yet")
        return self._strategy

    # -- feature agreement (MEDS sites) --------------------------------------------------------
    def agree(self, nodes: list[int]) -> None:
        """Agree on the MEDS sites' vocabulary over ``nodes``; the experiment (which every later
        message carries), the data spec and θ follow from it; it is recorded in the run folder."""
        from fedmeta.common.data.meds.source import with_vocabulary
        from fedmeta.server.agreement import agree_vocabulary

        identity = self.identity()
        registered = identity.admitted if identity is not None else None
        usable = [n for n in nodes if registered is None or n in registered]
        agreement = agree_vocabulary(self.grid, self.cfg, usable, self.say, registered)
        for node, why in agreement.excluded.items():
            if self.audit is not None:
                self.audit.record("site_excluded", run_id=self.run_id, node_id=node,
                                  site=(registered or {}).get(node), reason=why[:200])
        self.sites = self.sites.merged(Sites(excluded=agreement.excluded))
        self.agreement = {**agreement.record(), "reused": False}
        self.use_vocabulary(with_vocabulary(self.cfg, agreement.vocabulary))
        self.folder.write_json(self.folder.vocabulary, {
            **self.agreement, "vocabulary": json.loads(agreement.vocabulary.to_json())})

    def use_vocabulary(self, cfg: ExperimentConfig) -> None:
        """Run ``cfg`` (the experiment carrying the vocabulary) from here on."""
        self.cfg = cfg
        self.spec = data_spec(cfg.data)
        self._strategy = FedMetaStrategy(cfg, self.spec, initial_parameters(cfg, self.spec))
        self.folder.write_json(self.folder.config, cfg.to_dict())

    # -- who takes part ------------------------------------------------------------------------
    def identity(self) -> NodeIdentity | None:
        """The registry's naming of the online nodes (deployment), None in simulation; refusals
        are written to the audit log once per node."""
        identity = admitted_names(self.grid, Registry.from_env(), self.refused)
        if identity is None:
            return None
        for node, (fingerprint, why) in identity.refused.items():
            if node not in self.refused and self.audit is not None:
                self.audit.record("node_refused", run_id=self.run_id, node_id=node,
                                  fingerprint=fingerprint[:100], reason=why[:200])
        self.refused.update(identity.refused)
        return identity

    def refresh(self) -> None:
        """Greet nodes that connected since the last round; drop sites no longer admitted."""
        identity = self.identity()
        if identity is None:
            online = set(self.grid.get_node_ids())
            registered = None
        else:
            online = set(identity.admitted)
            registered = identity.admitted
            self.sites = self.sites.keep(online)
        new = sorted(online - set(self.sites.names) - set(self.sites.excluded))
        self.probe(sorted((self.unresponsive & online) - set(new)), registered)
        if new:
            greeted = greet(self.grid, self.cfg, new, self.spec.layout(), self.say, registered)
            for node, why in greeted.excluded.items():
                if self.audit is not None:
                    self.audit.record("site_excluded", run_id=self.run_id, node_id=node,
                                      site=(registered or {}).get(node), reason=why[:200])
            self.sites = self.sites.merged(greeted)
            self.welcome_back(set(greeted.names))

    def welcome_back(self, nodes: set[int]) -> None:
        """Sample again the unresponsive ones of ``nodes`` (they answered a greeting)."""
        for node in sorted(nodes & self.unresponsive):
            self.unresponsive.discard(node)
            self.say(f"site {self.sites.names.get(node, node)} is back")

    def probe(self, back: list[int], registered: dict[int, str] | None) -> None:
        """Greet the unresponsive nodes ``back`` (online again) without making a round wait.

        On a push/pull grid (a deployment) each gets a greeting living :data:`PROBE_TTL_S`, and its
        answer is collected at a later refresh: a dead node the SuperLink still lists as online
        (until its heartbeat lapses, up to 20 s) costs no round anything, where waiting for its
        answer cost every round in that window the greeting's 5 s. One greeting per node at a
        time. An in-process grid answers at once, as before."""
        if not _push_pull(self.grid):
            if back:
                quick = self.cfg.model_copy(update={"federation": self.cfg.federation.model_copy(
                    update={"timeout_s": min(PROBE_TTL_S, self.cfg.federation.timeout_s)})})
                answered = greet(self.grid, quick, back, self.spec.layout(), lambda _: None, registered)
                self.welcome_back(set(answered.names))
            return
        now = time.monotonic()
        if self.probes:
            replies = []
            for reply in self.grid.pull_messages(list(self.probes)):
                node, _ = self.probes.pop(reply.metadata.reply_to_message_id, (None, 0.0))
                if node is not None and reply.metadata.src_node_id == node:  # not the SuperLink's error
                    replies.append(reply)
            self.welcome_back(set(read_greetings(replies, lambda _: None, registered).names))
            self.probes = {m: (n, t) for m, (n, t) in self.probes.items() if now - t < PROBE_TTL_S + 1.0}
        waiting = {n for n, _ in self.probes.values()}
        todo = [n for n in back if n not in waiting and n in self.unresponsive]
        if todo:
            ttl = min(PROBE_TTL_S, self.cfg.federation.timeout_s)
            ids = self.grid.push_messages(hello_messages(self.cfg, todo, self.spec.layout(), ttl=ttl))
            for mid, node in zip(ids, todo, strict=True):
                self.probes[mid] = (node, now)

    def start(self, expected: int) -> None:
        nodes = wait_for_nodes(self.grid, expected, self.cfg.federation.timeout_s,
                               admitted=self.identity if self.deployed else None)
        if self.spec.needs_agreement:
            self.agree(nodes)
        self.refresh()
        if len(self.sites.names) < self.cfg.federation.min_nodes:
            silent = [n for n in nodes if n not in self.sites.names and n not in self.sites.excluded]
            identity = self.identity()
            named = identity.admitted if identity is not None else {}
            excluded = "; ".join(f"{named.get(n, f'node {n}')}: {why}" for n, why in self.sites.excluded.items())
            raise FedmetaError(
                f"{len(self.sites.names)} site(s) can take part, fewer than federation.min_nodes = "
                f"{self.cfg.federation.min_nodes}" + (f"; excluded: {excluded}" if excluded else "")
                + (f"; {len(silent)} of {len(nodes)} site(s) did not answer the greeting within "
                   f"federation.timeout_s = {self.cfg.federation.timeout_s:g} s (a site that failed to "
                   "start, or a machine too busy to run it: see the sites' logs, or raise the timeout)"
                   if silent else ""))

    # -- rounds --------------------------------------------------------------------------------
    def exchange(self, messages: list[Message], *, quorum: int,
                 on_reply: Callable[[Message], None] | None = None, timeout_s: float | None = None) -> Outcome:
        limit = self.cfg.federation.timeout_s if timeout_s is None else timeout_s
        return exchange(self.grid, messages, Waiting(timeout_s=limit, quorum=max(1, quorum)), on_reply)

    def train_round(self, server_round: int) -> RoundResult:
        self.refresh()
        available = {n: s for n, s in self.sites.names.items() if n not in self.unresponsive}
        plan: TrainPlan = self.strategy.configure_train(server_round, available)
        if self.audit is not None:
            self.audit.round_started(run_id=self.run_id, round=server_round, nodes=list(plan.nodes))
        outcome = self.exchange(plan.messages, quorum=self.cfg.federation.min_nodes)
        result = self.strategy.aggregate_train(plan, outcome.replies, declared=self.sites.n_train)
        for node in outcome.missing:
            self.unresponsive.add(node)
            result.log.missing.append(plan.nodes.get(node, f"node {node}"))
        if outcome.missing:
            self.say(f"round {server_round}: no reply from {sorted(result.log.missing)} "
                     f"({outcome.ended}); not sampled until they answer again")
        if self.cfg.privacy.dp:
            result.log.epsilon = _epsilon(self.cfg, server_round)
        if self.audit is not None:
            self.audit.round_outcome(
                run_id=self.run_id, round=server_round, sampled_nodes=list(plan.nodes),
                node_names=self.sites.names, accepted_sites=result.log.accepted,
                rejected_sites=result.log.rejected,
                examples={s: m["num_examples"] for s, m in result.log.site_metrics.items()},
                missing_reasons={n: f"no reply: {outcome.undelivered.get(n, outcome.ended)}"
                                 for n in outcome.missing},
            )
        self.totals["bytes_up"] += result.log.bytes_up
        self.totals["bytes_down"] += result.log.bytes_down
        return result

    def evaluate(self, server_round: int, *, announce: bool = False) -> tuple[dict[str, dict], dict[str, dict]]:
        self.refresh()
        messages = self.strategy.configure_evaluate(server_round, self.sites.names)
        self.totals["bytes_down"] += payload_bytes(record_from_arrays(self.strategy.state())) * len(messages)
        t0, done = time.monotonic(), [0]

        def on_reply(reply: Message) -> None:
            done[0] += 1
            site = self.sites.names.get(reply.metadata.src_node_id, "a site")
            self.say(f"evaluation: {site} done ({done[0]}/{len(messages)}, {time.monotonic() - t0:.1f} s)")

        if announce:
            self.say(f"evaluating the final state at {len(messages)} sites (each adapts and scores "
                     "its own test split)")
        return federated_evaluation(
            lambda m: self.exchange(m, quorum=len(m), on_reply=on_reply if announce else None,
                                    timeout_s=self.cfg.federation.eval_timeout_s).replies,
            messages, self.sites.names, self.cfg.data.holdout, self.declined, self.spec.outcomes)

    def sites_label(self, node: int) -> str:
        """A node's registered name when it has one, else ``node N``."""
        identity = self.identity()
        return identity.admitted.get(node, f"node {node}") if identity else f"node {node}"

    def checkpoint(self, server_round: int) -> None:
        arrays, meta = self.strategy.checkpoint()
        self.folder.save_checkpoint(arrays, {**meta, "round": server_round, "totals": self.totals})


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
    if cfg.algorithm == AUTO:
        if resume or stop_after is not None:
            raise ConfigError("algorithm auto: a selection is not resumed; resume the chosen "
                              "experiment (its config.json) instead")
        from fedmeta.server.selection import select

        return select(grid, cfg, out_dir, run_experiment, say=say, expected_nodes=expected_nodes)
    t0 = time.monotonic()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    folder = RunFolder(out_dir)
    recorded = _recorded_vocabulary(folder, cfg) if resume else None
    if recorded is not None:
        cfg = recorded[0]
    run = _Run(grid, cfg, folder, say)
    log.info("effective configuration: %s", cfg.to_json())
    folder.write_json(folder.config, cfg.to_dict())
    if recorded is not None:
        run.agreement = {**recorded[1], "reused": True}
        say(f"reusing the run's vocabulary {cfg.data.meds.fingerprint[:12]} "
            f"({run.spec.input_shape[0]} features)")
    elif resume and run.spec.needs_agreement and folder.checkpoint.exists():
        raise FedmetaError(f"{folder.vocabulary}: missing; a resumed run on MEDS sites needs the "
                           "vocabulary its checkpoint was trained on")

    run.audit, run.run_id = _open_audit(grid)
    run.start(expected_nodes or cfg.federation.min_nodes)
    cfg = run.cfg  # on MEDS sites: now carrying the agreed vocabulary
    if run.audit is not None:
        run.audit.run_started(
            run_id=run.run_id, algorithm=cfg.algorithm, rounds=cfg.rounds,
            config_sha256=hashlib.sha256(cfg.to_json().encode()).hexdigest(),
            nodes=sorted(run.sites.names))
    run.strategy.describe()
    first_round = 1
    history: list[dict] = []
    if resume and folder.checkpoint.exists():
        arrays, meta = folder.load_checkpoint()
        run.strategy.restore(arrays, meta, source=str(folder.checkpoint))
        run.totals = {k: float(v) for k, v in meta["totals"].items()}
        t0 -= run.totals["wall_s"]  # wall time counts the interrupted part too
        first_round = int(meta["round"]) + 1
        history = folder.read_rounds(first_round - 1)
        say(f"resuming {out_dir} after round {first_round - 1}")
        if run.audit is not None:
            run.audit.checkpoint_resumed(run_id=run.run_id, round=first_round - 1)
    folder.reset_rounds(history)

    round_s: list[float] = []
    extra_summary: dict[str, Any] = {}
    newton = run.strategy.algorithm.procedure == "newton"
    if newton:  # the federated GLM: Newton steps on summed sums instead of meta-learning rounds
        from fedmeta.server.glm import fit_glm

        folder.reset_rounds([])
        theta_glm, extra_summary = fit_glm(
            cfg, run.sites.names, run.strategy.theta(),
            lambda m: run.exchange(m, quorum=len(m)), on_round=folder.append_round, say=say)
        run.strategy.set_state(theta_glm)
        run.totals["bytes_up"] += extra_summary["glm"]["bytes_up"]
        run.totals["bytes_down"] += extra_summary["glm"]["bytes_down"]
    for server_round in range(first_round, (0 if newton else cfg.rounds) + 1):
        t_round = time.monotonic()
        result = run.train_round(server_round)
        rec = result.log
        line = asdict(rec) | {"wall_s": round(time.monotonic() - t_round, 4), "applied": result.applied}
        interim = None
        if cfg.eval.every and server_round % cfg.eval.every == 0 and server_round < cfg.rounds:
            sites, _ = run.evaluate(server_round)
            interim = {"sites": sites, "mean": summary_mean(sites) if sites else {}}
            line["eval"] = interim
        folder.append_round(line)
        run.totals["wall_s"] = time.monotonic() - t0
        run.checkpoint(server_round)
        round_s.append(time.monotonic() - t_round)
        left = (cfg.rounds - server_round) * float(np.median(round_s))
        say(
            f"round {server_round}/{cfg.rounds}: {len(rec.accepted)}/{len(rec.sampled)} sites, "
            + (f"query loss {rec.query_loss_before:.4f} -> {rec.query_loss_after:.4f} after adaptation"
               if math.isfinite(rec.query_loss_before) else f"query loss {rec.query_loss_after:.4f} after adaptation")
            + (f", rejected {sorted(rec.rejected)}" if rec.rejected else "")
            + (f", DP ε = {rec.epsilon:.2f} at δ = {cfg.privacy.delta:g}" if rec.epsilon is not None else "")
            + f" ({round_s[-1]:.1f} s" + (f"; rounds left: about {left:.0f} s)" if left > 0 else ")")
        )
        if interim is not None and interim["mean"]:
            after = interim["mean"].get("after", {})
            shown = [f"{k} {after[k]:.3f}" for k in ("accuracy", "auroc", "loss") if k in after]
            say(f"round {server_round}: evaluation after adaptation, mean over sites: "
                + (", ".join(shown) if shown else "withheld by every site (below its patient floor)"))
        if stop_after is not None and server_round >= stop_after:
            if run.audit is not None:
                run.audit.run_finished(run_id=run.run_id, status="stopped", rounds_completed=server_round)
            return {"stopped_after": server_round}

    per_site, holdout = run.evaluate(cfg.rounds, announce=True)
    if not per_site:
        raise FedmetaError("no site returned an evaluation; see the log for their errors")
    theta = run.strategy.state()  # θ plus learned state (Meta-SGD's rates: a new site adapts with them)
    folder.save_final(theta, {"algorithm": cfg.algorithm, "rounds": cfg.rounds, "seed": cfg.seed,
                              "config": cfg.to_json(), "sites": sorted(per_site)})
    summary = {
        "algorithm": cfg.algorithm,
        "rounds": extra_summary["glm"]["newton_steps"] if newton else cfg.rounds,
        "seed": cfg.seed,
        "wall_s": round(time.monotonic() - t0, 3),
        "provenance": provenance(started_at),
        "config": cfg.to_dict(),
        "sites": dict(sorted(per_site.items())),
        "mean": summary_mean(per_site),
        "comm": {"bytes_up": int(run.totals["bytes_up"]), "bytes_down": int(run.totals["bytes_down"])},
        "params": {"count": int(sum(v.size for v in theta.values())), "file": folder.final.name},
    }
    if cfg.privacy.dp:
        summary["privacy"] = {
            "epsilon": _epsilon(cfg, cfg.rounds), "delta": cfg.privacy.delta, "clip": cfg.privacy.clip,
            "noise_multiplier": cfg.privacy.noise_multiplier, "adjacency": "site-level",
        }
    if holdout:
        summary["holdout"] = {"sites": dict(sorted(holdout.items())), "mean": summary_mean(holdout)}
    if run.agreement is not None:
        summary["vocabulary"] = {**run.agreement, "file": folder.vocabulary.name}
    if run.declined or run.sites.excluded:
        summary["declined"] = dict(sorted(run.declined.items()))
        summary["excluded"] = {run.sites_label(n): why for n, why in sorted(run.sites.excluded.items())}
    summary.update(run.strategy.summary_extra())
    summary.update(extra_summary)
    folder.write_json(folder.summary, summary)
    if run.audit is not None:
        run.audit.run_finished(run_id=run.run_id, status="completed", rounds_completed=cfg.rounds)
    return summary


def _recorded_vocabulary(folder: RunFolder, cfg: ExperimentConfig) -> tuple[ExperimentConfig, dict[str, Any]] | None:
    """A resumed run's experiment with the vocabulary its folder recorded, and the record (None
    when the folder holds none). An experiment carrying another vocabulary is refused."""
    from fedmeta.common.data.meds.source import with_vocabulary
    from fedmeta.common.data.meds.vocabulary import Vocabulary

    if not folder.vocabulary.exists():
        return None
    try:
        record = json.loads(folder.vocabulary.read_text())
        vocab = Vocabulary.model_validate(record["vocabulary"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{folder.vocabulary}: not a vocabulary record ({e})") from None
    if cfg.data.meds.fingerprint and cfg.data.meds.fingerprint != vocab.fingerprint():
        raise ConfigError(
            f"data.meds.fingerprint = {cfg.data.meds.fingerprint[:12]}…: the run being resumed was "
            f"trained on vocabulary {vocab.fingerprint()[:12]}… ({folder.vocabulary})")
    return with_vocabulary(cfg, vocab), {k: v for k, v in record.items() if k not in ("vocabulary", "reused")}


def provenance(started_at: str) -> dict[str, Any]:
    """What produced a run: versions, the source commit (when run from a git checkout), the
    coordinator's device and threads, and when it started."""
    import subprocess
    from importlib import metadata

    import torch

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    commit = None
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False)
        if out.returncode == 0:
            commit = out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "fedmeta": version("fedmeta"), "flwr": version("flwr"), "torch": torch.__version__,
        "git_commit": commit, "started_at": started_at,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads(),
    }


def _open_audit(grid: Grid) -> tuple[audit_log.AuditLog | None, int]:
    """The coordinator's audit log (deployment only: ``$FEDMETA_AUDIT_LOG``) and the run id."""
    audit = audit_log.from_env()
    if audit is None:
        return None, 0
    try:
        run_id = int(grid.run.run_id)
    except (AttributeError, NotImplementedError):
        run_id = 0
    return audit, run_id
