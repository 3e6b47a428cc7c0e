"""Who a connected node is, decided by the consortium's registry, never by the node.

In a deployment the coordinator is started with ``$FEDMETA_REGISTRY`` naming the consortium's
``registry.json`` (public key fingerprint -> site name, active or revoked). Every node the
SuperLink reports carries the public key it authenticated with; the coordinator names it by the
registry entry of that key. A node whose key is not an *active* registry entry — registered
through Flower's own CLI, or revoked — is never greeted, sampled or evaluated, and is reported
once by fingerprint. What a node says its name is does not matter.

In simulation (no registry) every node is a site of the experiment's own data source on this
machine, named by what it answers to the greeting.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedmeta.common.errors import FedmetaError
from fedmeta.protocol.environment import REGISTRY as REGISTRY_ENV
from fedmeta.protocol.fingerprint import fingerprint_of_bytes

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class NodeIdentity:
    """The registry's verdict on the connected nodes: ``admitted`` node id -> site name, and
    ``refused`` node id -> (key fingerprint or "unknown key", why)."""

    admitted: dict[int, str] = field(default_factory=dict)
    refused: dict[int, tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Registry:
    """Active and revoked sites by key fingerprint (read from ``registry.json``)."""

    active: dict[str, str]
    revoked: dict[str, str]
    source: str = "<memory>"

    @classmethod
    def load(cls, path: Path) -> Registry:
        """The registry at ``path`` (a ``registry.json``), read by the one reader that checks its
        signature (:meth:`fedmeta.protocol.registry.Registry.load`): a registry the consortium CA
        did not sign is an error naming the file, never a fallback."""
        from fedmeta.protocol.registry import REGISTRY
        from fedmeta.protocol.registry import Registry as SignedRegistry

        if path.name != REGISTRY:
            raise FedmetaError(f"{path}: the consortium registry must be a file named {REGISTRY}")
        sites = SignedRegistry.load(path.parent).sites.values()
        active = {s.fingerprint: s.name for s in sites if s.status == "active"}
        revoked = {s.fingerprint: s.name for s in sites if s.status != "active"}
        return cls(active, revoked, str(path))

    @classmethod
    def from_env(cls) -> Registry | None:
        """The registry named by ``$FEDMETA_REGISTRY`` (re-read on every call: a revocation
        during a run takes effect at the next round), or None in simulation."""
        value = os.environ.get(REGISTRY_ENV, "")
        return cls.load(Path(value)) if value else None

    def identify(self, nodes: Iterable[tuple[int, bytes]]) -> NodeIdentity:
        """Name ``(node id, public key bytes)`` pairs by the registry."""
        admitted: dict[int, str] = {}
        refused: dict[int, tuple[str, str]] = {}
        for node_id, key in nodes:
            fp = fingerprint_of_bytes(key) if key else None
            if fp is None:
                refused[node_id] = ("unknown key", "the node presented no readable public key")
            elif fp in self.active:
                admitted[node_id] = self.active[fp]
            elif fp in self.revoked:
                refused[node_id] = (fp, f"the key of site {self.revoked[fp]} is revoked")
            else:
                refused[node_id] = (fp, "the key is not in the consortium registry")
        return NodeIdentity(admitted, refused)


def connected_nodes(grid: object) -> list[tuple[int, bytes]] | None:
    """``(node id, public key)`` of the online nodes when the grid reports keys (a deployment's
    ``HttpGrid``), else None."""
    get_nodes = getattr(grid, "get_nodes", None)
    if get_nodes is None:
        return None
    return [(int(n.node_id), bytes(n.public_key)) for n in get_nodes()]


def admitted_names(grid: object, registry: Registry | None,
                   previous: Mapping[int, tuple[str, str]] | None = None) -> NodeIdentity | None:
    """The registry's naming of the online nodes (None in simulation); new refusals are logged."""
    if registry is None:
        return None
    nodes = connected_nodes(grid)
    if nodes is None:
        raise FedmetaError("a consortium registry is set but the grid reports no node keys")
    identity = registry.identify(nodes)
    for node, (fp, why) in identity.refused.items():
        if previous is None or node not in previous:
            log.warning("node %d (key %s) refused: %s", node, fp, why)
    return identity
