"""A hospital's own audit log (``STATE/audit.jsonl`` beside its node file): what its node was
asked, what it refused and what it served, with counts and ids only.

========================  ==============================================================
``site_started``          site, version, code_sha256, policy_min_patients
``site_stopped``          site, served, refused
``app_refused``           run_id, app, version, bundle_sha256, reason
``request_served``        run_id, round, phase, step, algorithm, num_examples, seconds
``request_failed``        run_id, round, phase, algorithm, category, rule (a policy refusal's
                          rule, e.g. the ε budget's spent and asked-for figures; else absent)
``node_restarted``        attempt, wait_s, reason
========================  ==============================================================
"""

from __future__ import annotations

from fedmeta.common.audit import AuditLog, read_log

EVENTS: dict[str, frozenset[str]] = {
    "site_started": frozenset({"site", "version", "code_sha256", "policy_min_patients"}),
    "site_stopped": frozenset({"site", "served", "refused"}),
    "app_refused": frozenset({"run_id", "app", "version", "bundle_sha256", "reason"}),
    "request_served": frozenset({"run_id", "round", "phase", "step", "algorithm", "num_examples", "seconds"}),
    "request_failed": frozenset({"run_id", "round", "phase", "algorithm", "category", "rule"}),
    "node_restarted": frozenset({"attempt", "wait_s", "reason"}),
}


class SiteAudit(AuditLog):
    """The site's audit log."""

    events = EVENTS


__all__ = ["EVENTS", "SiteAudit", "read_log"]
