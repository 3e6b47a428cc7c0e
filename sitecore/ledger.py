"""The site's own count of what it has served, kept across runs: a disclosure-control budget and
a differential-privacy budget.

Every evaluation a site answers releases numbers computed on its patients for a θ the
coordinator chose; enough of them, with crafted θ, sweep out counts of single patients. The
coordinator cannot be trusted to say how many it will ask for, so the site counts: evaluations
and training requests per run, and all requests per UTC day, against its policy's ceilings
(``max_evaluations_per_run``, ``max_train_requests_per_run``, ``max_requests_per_day``). A request
over a ceiling is refused before any data is read. The counts live in the site's state folder
(``ledger.json``, owner-only), so restarting the site or starting a new run does not reset the
day's budget.

**The ε ledger.** ``max_epsilon`` holds per run, and runs are unlimited, so with ``require_dp``
the site also spends ε across runs against its ``dp_epsilon_budget`` (at its own ``dp_delta``):

- *what is charged, when*: a run's whole declared experiment, ``rounds`` Gaussian releases at
  its ``privacy.noise_multiplier``, at its first DP training request (the first release), before
  any data is read; each DP training request then counts one release, and the one past the
  declared ``rounds`` is refused (a coordinator declaring fewer rounds than it sends gains
  nothing). Every distinct experiment a run sends is charged in full on its own (``algorithm:
  auto`` trains several candidates in one run; a coordinator varying the experiment every round
  pays for a whole run each time). A greeting is checked against the budget but charges nothing,
  so a run that would overspend is refused at the greeting already. Charges are never refunded:
  a request refused or failed after its charge stays spent (the safe side), and a resumed run is
  a new run, charged again in full;
- *composition*: the charges are composed in Rényi DP (:func:`fedmeta.common.privacy.composed_epsilon`:
  the Gaussian mechanism's RDP adds up over rounds and over runs, adaptive ones included), then
  converted to ε once at the site's current ``dp_delta``. That is the same accountant the per-run
  ``max_epsilon`` check uses, never above the sum of the runs' own ε (basic composition, which
  also spends δ once per run) and much tighter: ten runs of 10 rounds at ``z = 1`` are ε = 96.1
  composed, 190.5 summed. No amplification by site sampling is claimed, every declared round
  counts;
- *period*: none. Privacy loss does not expire, so the charges are kept for as long as the state
  folder lives (the request counts above are forgotten after a month; the ε charges never are).
  A hospital that decides to spend more raises ``dp_epsilon_budget`` in its own ``node.yaml``;
  what was spent stays spent.

The file is read again, under an exclusive lock on ``ledger.json.lock``, before each change and
written atomically, so a restarted worker, or a second process on the same state folder, neither
double-spends nor under-spends.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedmeta.common.config import ExperimentConfig
from fedmeta.sitecore.policy import PolicyRefusal, SitePolicy

_KEEP_DAYS = 31


class RequestLedger:
    """Counts per run (``evaluate``, ``train``) and per day; ``path`` None keeps them in memory."""

    def __init__(self, path: Path | None, *, today: Any = None) -> None:
        self.path = path
        self._today = today or (lambda: dt.datetime.now(dt.UTC).date().isoformat())
        self._lock = threading.Lock()
        self._doc: dict[str, Any] = {"runs": {}, "days": {}, "dp": {"charges": {}}}
        self._reload()

    def _reload(self) -> None:
        if self.path is None or not self.path.exists():
            return
        doc = json.loads(self.path.read_text())
        if not isinstance(doc, dict) or not isinstance(doc.get("runs"), dict) or not isinstance(doc.get("days"), dict):
            raise ValueError(f"{self.path}: not a request ledger")
        dp = doc.setdefault("dp", {"charges": {}})  # a ledger written before the ε ledger
        if not isinstance(dp, dict) or not isinstance(dp.get("charges"), dict):
            raise ValueError(f"{self.path}: not a request ledger (its 'dp' entry is malformed)")
        self._doc = doc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's lock and, with a file, an exclusive lock on ``ledger.json.lock``; the
        file is read again inside, so another process's changes are seen before this one's."""
        with self._lock:
            if self.path is None:
                yield
                return
            import fcntl

            fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._reload()
                yield
            finally:
                os.close(fd)  # releases the lock

    def charge(self, policy: SitePolicy, *, run_id: int, kind: str) -> None:
        """Count one request of ``kind`` (``evaluate``, ``train`` or ``query``) in run ``run_id``,
        or raise :class:`PolicyRefusal` (counting nothing) when it would pass a ceiling."""
        with self._locked():
            day = self._today()
            used_today = int(self._doc["days"].get(day, 0))
            if used_today >= policy.max_requests_per_day:
                raise PolicyRefusal(f"this site has served {used_today} requests today, its "
                                    f"max_requests_per_day = {policy.max_requests_per_day}")
            run = self._doc["runs"].setdefault(str(run_id), {"day": day, "evaluate": 0, "train": 0})
            ceilings = {"evaluate": ("max_evaluations_per_run", policy.max_evaluations_per_run),
                        "train": ("max_train_requests_per_run", policy.max_train_requests_per_run)}
            if kind in ceilings:
                name, limit = ceilings[kind]
                if int(run[kind]) >= limit:
                    raise PolicyRefusal(f"run {run_id} has had {run[kind]} {kind} requests, this site's "
                                        f"{name} = {limit}")
                run[kind] = int(run[kind]) + 1
            self._doc["days"][day] = used_today + 1
            self._prune(day)
            self._save()

    def spend_epsilon(self, policy: SitePolicy, cfg: ExperimentConfig, *, run_id: int,
                      release: bool) -> None:
        """The ε ledger's gate for one request of run ``run_id`` with experiment ``cfg`` (nothing
        to do without a ``dp_epsilon_budget`` or without ``privacy.dp``).

        ``release`` False (a greeting): refuse a run whose whole experiment would take the site
        past its budget; nothing is written. ``release`` True (a DP training request): charge the
        whole experiment the first time (refused, charging nothing, when that would pass the
        budget), then count one release, refusing the one past the declared rounds."""
        budget = policy.dp_epsilon_budget
        if budget is None or not cfg.privacy.dp:
            return
        key = f"{run_id}/{_experiment_digest(cfg)}"
        z = float(cfg.privacy.noise_multiplier)
        with self._locked():
            charges = self._doc["dp"]["charges"]
            entry = charges.get(key)
            if entry is None:
                spent = self._composed(policy)
                after = self._composed(policy, extra=(cfg.rounds, z))
                if after > budget:
                    raise PolicyRefusal(
                        f"run {run_id}'s {cfg.rounds} rounds at noise_multiplier {z:g} would bring this "
                        f"site's ε to {after:.3g} (at δ = {policy.dp_delta:g}, {spent:.3g} spent before), "
                        f"past its dp_epsilon_budget = {budget:g}")
                if not release:
                    return
                entry = charges[key] = {"run": int(run_id), "rounds": int(cfg.rounds), "noise_multiplier": z,
                                        "released": 0, "day": self._today()}
            if not release:
                return
            if int(entry["released"]) >= int(entry["rounds"]):
                raise PolicyRefusal(f"run {run_id} declared {entry['rounds']} rounds and has had "
                                    f"{entry['released']} DP releases; this site charged ε for "
                                    f"{entry['rounds']} only")
            entry["released"] = int(entry["released"]) + 1
            self._save()

    def epsilon_spent(self, policy: SitePolicy) -> float:
        """ε (at the policy's ``dp_delta``) of every charge so far, composed in RDP."""
        with self._locked():
            return self._composed(policy)

    def charges(self) -> list[dict[str, Any]]:
        """The ε charges: run, declared rounds, noise multiplier, releases so far, day charged."""
        with self._locked():
            return [dict(v) for v in self._doc["dp"]["charges"].values()]

    def _composed(self, policy: SitePolicy, extra: tuple[int, float] | None = None) -> float:
        from fedmeta.common.privacy import composed_epsilon

        releases = [(int(v["rounds"]), float(v["noise_multiplier"])) for v in self._doc["dp"]["charges"].values()]
        return composed_epsilon([*releases, *([extra] if extra else [])], delta=policy.dp_delta)

    def used(self, run_id: int) -> dict[str, int]:
        run = self._doc["runs"].get(str(run_id), {})
        return {"evaluate": int(run.get("evaluate", 0)), "train": int(run.get("train", 0))}

    def _prune(self, today: str) -> None:
        cutoff = (dt.date.fromisoformat(today) - dt.timedelta(days=_KEEP_DAYS)).isoformat()
        self._doc["days"] = {d: n for d, n in self._doc["days"].items() if d >= cutoff}
        self._doc["runs"] = {r: v for r, v in self._doc["runs"].items() if str(v.get("day", today)) >= cutoff}

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._doc, f)
        os.replace(tmp, self.path)


def _experiment_digest(cfg: ExperimentConfig) -> str:
    """A run's experiment, by content: every distinct experiment is charged on its own."""
    return hashlib.sha256(cfg.to_json().encode()).hexdigest()[:16]
