"""A coordinator host whose fedmeta ServerApp was replaced (tests only): its operator is hostile.

The sites cannot see the coordinator's code; they see a bundle naming fedmeta's own components.
This shadow package stands first on the coordinator's PYTHONPATH, so ``fedmeta.server.app:app``
runs the decoy attack of ``hostile_server``.
"""

from hostile_server import app  # noqa: F401
