"""Append-only audit log on the coordinator: who joined, for which run, which rounds it served.

One JSON object per line (``audit.jsonl``); the log records identities and decisions, never data
(see :mod:`fedmeta.common.audit` for what a record may hold).

Events and their fields:

========================  ==============================================================
``node_registered``       site, node_id, fingerprint
``node_unregistered``     site, node_id, reason, fingerprint
``node_refused``          run_id, node_id, fingerprint, reason (a key not in the registry,
                          or revoked: never sampled)
``site_excluded``         run_id, node_id, site, reason (e.g. its feature layout differs)
``run_submitted``         run_id, sites
``run_started``           run_id, algorithm, rounds, config_sha256, nodes
``round_started``         run_id, round, nodes
``contribution``          run_id, round, node_id, site, accepted, reason, num_examples
``round_completed``       run_id, round, accepted, rejected, missing
``run_finished``          run_id, status, rounds_completed
``checkpoint_resumed``    run_id, round
``app_refused``           run_id, app, version, bundle_sha256, reason (a submitted bundle
                          that is not fedmeta's: none of its code ran)
========================  ==============================================================

The ServerApp finds the log through the environment variable ``FEDMETA_AUDIT_LOG`` (set by
``fedmeta coordinator start`` on the SuperLink, inherited by the ServerApp process); with no
variable, :func:`from_env` returns ``None`` and nothing is logged (simulation).
Site names come from ``nodes.json`` beside the log (written when keys are registered).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from fedmeta.common.audit import MAX_STR, AuditError, read_log
from fedmeta.common.audit import AuditLog as BaseAuditLog
from fedmeta.protocol.environment import AUDIT_LOG

__all__ = ["ENV_VAR", "EVENTS", "AuditError", "AuditLog", "from_env", "open_log", "read_log"]

log = logging.getLogger(__name__)

ENV_VAR = AUDIT_LOG

EVENTS: dict[str, frozenset[str]] = {
    "node_registered": frozenset({"site", "node_id", "fingerprint"}),
    "node_unregistered": frozenset({"site", "node_id", "reason", "fingerprint"}),
    "node_refused": frozenset({"run_id", "node_id", "fingerprint", "reason"}),
    "site_excluded": frozenset({"run_id", "node_id", "site", "reason"}),
    "run_submitted": frozenset({"run_id", "sites"}),
    "run_started": frozenset({"run_id", "algorithm", "rounds", "config_sha256", "nodes"}),
    "round_started": frozenset({"run_id", "round", "nodes"}),
    "contribution": frozenset(
        {"run_id", "round", "node_id", "site", "accepted", "reason", "num_examples"}
    ),
    "round_completed": frozenset({"run_id", "round", "accepted", "rejected", "missing"}),
    "run_finished": frozenset({"run_id", "status", "rounds_completed"}),
    "checkpoint_resumed": frozenset({"run_id", "round"}),
    "app_refused": frozenset({"run_id", "app", "version", "bundle_sha256", "reason"}),
}


class AuditLog(BaseAuditLog):
    """The coordinator's audit log (:data:`EVENTS`); ``site_names`` names node ids."""

    events = EVENTS

    def __init__(self, path: Path, *, site_names: Mapping[int, str] | None = None) -> None:
        super().__init__(path)
        self.site_names = dict(site_names or {})

    def site_of(self, node_id: int) -> str | None:
        """The registered site name of ``node_id`` (``None`` if unknown)."""
        return self.site_names.get(int(node_id))

    # Convenience wrappers with fixed signatures (what the ServerApp calls).

    def run_started(
        self, *, run_id: int, algorithm: str, rounds: int, config_sha256: str,
        nodes: Iterable[int],
    ) -> None:
        self.record("run_started", run_id=int(run_id), algorithm=algorithm, rounds=int(rounds),
                    config_sha256=config_sha256, nodes=[int(n) for n in nodes])

    def round_started(self, *, run_id: int, round: int, nodes: Iterable[int]) -> None:  # noqa: A002
        self.record("round_started", run_id=int(run_id), round=int(round),
                    nodes=[int(n) for n in nodes])

    def contribution(
        self, *, run_id: int, round: int, node_id: int, accepted: bool,  # noqa: A002
        reason: str | None = None, num_examples: int | None = None,
    ) -> None:
        self.record("contribution", run_id=int(run_id), round=int(round), node_id=int(node_id),
                    site=self.site_of(node_id), accepted=bool(accepted), reason=reason,
                    num_examples=None if num_examples is None else int(num_examples))

    def round_completed(
        self, *, run_id: int, round: int, accepted: Iterable[int],  # noqa: A002
        rejected: Iterable[int], missing: Iterable[int],
    ) -> None:
        self.record("round_completed", run_id=int(run_id), round=int(round),
                    accepted=[int(n) for n in accepted], rejected=[int(n) for n in rejected],
                    missing=[int(n) for n in missing])

    def round_outcome(
        self,
        *,
        run_id: int,
        round: int,  # noqa: A002
        sampled_nodes: Iterable[int],
        node_names: Mapping[int, str],
        accepted_sites: Iterable[str],
        rejected_sites: Mapping[str, str],
        examples: Mapping[str, float] | None = None,
        missing_reasons: Mapping[int, str] | None = None,
    ) -> None:
        """One ``contribution`` per sampled node, then ``round_completed``.

        ``node_names`` maps node ids to the names the strategy uses in ``accepted_sites`` and
        ``rejected_sites`` (site -> reason); a sampled node in neither did not reply, for the
        reason in ``missing_reasons`` (node -> why the wait for it ended) when given.
        """
        accepted_names = set(accepted_sites)
        acc: list[int] = []
        rej: list[int] = []
        miss: list[int] = []
        for node in sampled_nodes:
            name = node_names.get(int(node), str(node))
            if name in accepted_names:
                acc.append(int(node))
                n = (examples or {}).get(name)
                self.contribution(run_id=run_id, round=round, node_id=node, accepted=True,
                                  num_examples=None if n is None else int(n))
            elif name in rejected_sites:
                rej.append(int(node))
                self.contribution(run_id=run_id, round=round, node_id=node, accepted=False,
                                  reason=rejected_sites[name][:MAX_STR])
            else:
                miss.append(int(node))
                why = (missing_reasons or {}).get(int(node), "no reply before the round timeout")
                self.contribution(run_id=run_id, round=round, node_id=node, accepted=False,
                                  reason=why[:MAX_STR])
        self.round_completed(run_id=run_id, round=round, accepted=acc, rejected=rej, missing=miss)

    def run_finished(self, *, run_id: int, status: str, rounds_completed: int) -> None:
        self.record("run_finished", run_id=int(run_id), status=status,
                    rounds_completed=int(rounds_completed))

    def checkpoint_resumed(self, *, run_id: int, round: int) -> None:  # noqa: A002
        self.record("checkpoint_resumed", run_id=int(run_id), round=int(round))


def _load_site_names(path: Path) -> dict[int, str]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {int(v): str(k) for k, v in raw.items()}


def open_log(path: Path) -> AuditLog:
    """An :class:`AuditLog` at ``path``, naming sites from ``nodes.json`` in the same folder."""
    return AuditLog(path, site_names=_load_site_names(path.parent / "nodes.json"))


def from_env() -> AuditLog | None:
    """The coordinator's audit log named by ``$FEDMETA_AUDIT_LOG``, or ``None`` if unset."""
    value = os.environ.get(ENV_VAR, "")
    if not value:
        return None
    return open_log(Path(value))



