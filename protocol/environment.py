"""Environment variables through which ``fedmeta coordinator start`` tells the ServerApp (a child
of the SuperLink) where the coordinator's files are."""

#: The coordinator's audit log (``STATE/audit.jsonl``).
AUDIT_LOG = "FEDMETA_AUDIT_LOG"
#: The consortium registry (``DEPLOYMENT/registry.json``): who may take part, by key.
REGISTRY = "FEDMETA_REGISTRY"
#: Where run folders go (``STATE/runs``).
RUNS_DIR = "FEDMETA_RUNS_DIR"
#: SHA-256 of the CA certificate the coordinator started with: the registry's signature is
#: checked against that certificate only.
CA_SHA256 = "FEDMETA_CA_SHA256"
