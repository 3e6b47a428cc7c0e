"""The consortium's registry (``registry.json``) as everyone who reads it reads it.

The registry names every site by the fingerprint of its key, active or revoked. It is signed with
the consortium CA's key where it is written (``fedmeta provision``, on the machine holding
``ca.key``; :mod:`fedmeta.deploy.provision`), and every reader (the operator's commands, the
coordinator at start, its ServerApp at every run: :mod:`fedmeta.server.identity`) checks that
signature here, against the CA certificate, before it trusts a line of it: a registry changed by
anyone without the CA key (a run, a local user) is an error naming the file, never a fallback.
Revocations made on the coordinator host (no CA key there) sit beside it in
``revocations.json``; they can only take a site out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fedmeta.common.errors import ProvisionError
from fedmeta.protocol.environment import CA_SHA256

REGISTRY = "registry.json"
#: Revocations made on the coordinator host (no CA key there): names only; they only take out.
REVOCATIONS = "revocations.json"
SIGNATURE = "signature"
SIGNATURE_HASH = hashes.SHA384()


def canonical(doc: dict[str, Any]) -> bytes:
    """The bytes a registry's signature covers: its document without the signature, as
    canonical JSON (sorted keys, no spaces, ASCII)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def registry_ca(out: Path) -> Path:
    """The CA certificate a registry in ``out`` is checked against (present on the operator's
    machine and on the coordinator host alike)."""
    return out / "coordinator" / "ca.crt"


def _verify(path: Path, raw: dict[str, Any], ca_path: Path) -> None:
    sig = raw.pop(SIGNATURE, None)
    if not isinstance(sig, str) or not sig:
        raise ProvisionError(f"{path}: the registry is not signed by the consortium CA; refusing it "
                             "(re-issue it with `fedmeta provision` on the machine holding ca.key)")
    try:
        ca_bytes = ca_path.read_bytes()
        ca = x509.load_pem_x509_certificate(ca_bytes)
    except (OSError, ValueError) as e:
        raise ProvisionError(f"{path}: cannot check the registry's signature: {ca_path}: {e}") from e
    pinned = os.environ.get(CA_SHA256, "")
    if pinned and hashlib.sha256(ca_bytes).hexdigest() != pinned:
        raise ProvisionError(f"{path}: {ca_path} is not the CA certificate the coordinator started "
                             "with; refusing the registry")
    key = ca.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ProvisionError(f"{path}: {ca_path} holds no EC key to check the registry with")
    try:
        key.verify(base64.b64decode(sig, validate=True), canonical(raw), ec.ECDSA(SIGNATURE_HASH))
    except (InvalidSignature, binascii.Error, ValueError) as e:
        raise ProvisionError(f"{path}: the registry's signature does not verify against {ca_path} "
                             "(changed since the consortium CA signed it); refusing it") from e


def revocations(out: Path) -> dict[str, str]:
    """Site -> reason of the revocations recorded on the coordinator host."""
    path = out / REVOCATIONS
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {str(k): str(v) for k, v in dict(raw).items()}
    except (OSError, ValueError, TypeError) as e:
        raise ProvisionError(f"{path}: unreadable revocations: {e}") from e


@dataclass
class SiteRecord:
    """What the coordinator knows of a hospital: never data, only identity and status."""

    name: str
    fingerprint: str
    public_key: str
    issued_at: str
    status: str = "active"  # "active" | "revoked"
    revoked_at: str | None = None
    reason: str | None = None


@dataclass
class Registry:
    """``registry.json``: the consortium's sites, read and checked (written, signed, by
    :class:`fedmeta.deploy.provision.Registry`)."""

    consortium: str
    created_at: str
    sites: dict[str, SiteRecord]

    @classmethod
    def load(cls, out: Path) -> Self:
        """The registry in ``out``, after its signature is checked against the consortium CA
        (:func:`registry_ca`); the coordinator host's own revocations are applied."""
        path = out / REGISTRY
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ProvisionError(
                f"{path}: no registry; run `fedmeta provision --consortium FILE --out {out}` first"
            ) from e
        except (OSError, json.JSONDecodeError) as e:
            raise ProvisionError(f"{path}: unreadable registry: {e}") from e
        if not isinstance(raw, dict):
            raise ProvisionError(f"{path}: unreadable registry: not a JSON object")
        _verify(path, raw, registry_ca(out))
        try:
            registry = cls(
                consortium=raw["consortium"],
                created_at=raw["created_at"],
                sites={k: SiteRecord(**v) for k, v in raw["sites"].items()},
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ProvisionError(f"{path}: unreadable registry: {type(e).__name__}: {e}") from e
        for name, reason in revocations(out).items():
            record = registry.sites.get(name)
            if record is not None and record.status == "active":
                record.status, record.reason = "revoked", reason
        return registry

    def active(self) -> list[SiteRecord]:
        return [s for s in self.sites.values() if s.status == "active"]
