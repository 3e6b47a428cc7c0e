"""Environment variables through which ``fedmeta coordinator start`` tells the ServerApp (a child
of the SuperLink) where the coordinator's files are."""

#: The coordinator's audit log (``STATE/audit.jsonl``).
AUDIT_LOG = "FEDMETA_AUDIT_LOG"
#: The consortium registry (``DEPLOYMENT/registry.json``): who may take part, by key.
REGISTRY = "FEDMETA_REGISTRY"
#: Where run folders go (``STATE/runs``).
RUNS_DIR = "FEDMETA_RUNS_DIR"
