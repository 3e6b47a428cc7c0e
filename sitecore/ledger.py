"""The site's own count of what it has served, kept across runs: a disclosure-control budget.

Every evaluation a site answers releases numbers computed on its patients for a θ the
coordinator chose; enough of them, with crafted θ, sweep out counts of single patients. The
coordinator cannot be trusted to say how many it will ask for, so the site counts: evaluations
and training requests per run, and all requests per UTC day, against its policy's ceilings
(``max_evaluations_per_run``, ``max_train_requests_per_run``, ``max_requests_per_day``). A request
over a ceiling is refused before any data is read. The counts live in the site's state folder
(``ledger.json``, owner-only), so restarting the site or starting a new run does not reset the
day's budget.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from pathlib import Path
from typing import Any

from fedmeta.sitecore.policy import PolicyRefusal, SitePolicy

_KEEP_DAYS = 31


class RequestLedger:
    """Counts per run (``evaluate``, ``train``) and per day; ``path`` None keeps them in memory."""

    def __init__(self, path: Path | None, *, today: Any = None) -> None:
        self.path = path
        self._today = today or (lambda: dt.datetime.now(dt.UTC).date().isoformat())
        self._lock = threading.Lock()
        self._doc: dict[str, Any] = {"runs": {}, "days": {}}
        if path is not None and path.exists():
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or not isinstance(doc.get("runs"), dict) or not isinstance(doc.get("days"), dict):
                raise ValueError(f"{path}: not a request ledger")
            self._doc = doc

    def charge(self, policy: SitePolicy, *, run_id: int, kind: str) -> None:
        """Count one request of ``kind`` (``evaluate``, ``train`` or ``query``) in run ``run_id``,
        or raise :class:`PolicyRefusal` (counting nothing) when it would pass a ceiling."""
        with self._lock:
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
