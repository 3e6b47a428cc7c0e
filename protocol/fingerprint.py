"""A node's identity as both sides name it: the fingerprint of the public key it authenticates with.

The coordinator matches the SuperLink's node records with the consortium registry by it
(:mod:`fedmeta.server.identity`), and provisioning writes it into the registry
(:mod:`fedmeta.deploy.sitekeys`). The format is OpenSSH's: ``SHA256:`` and the unpadded base64 of the
SHA-256 of the key blob.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmeta.common.errors import ProvisionError


def fingerprint(public_openssh: bytes) -> str:
    """OpenSSH-style fingerprint: ``SHA256:`` + unpadded base64 of the SHA-256 of the key blob."""
    parts = public_openssh.split()
    if len(parts) < 2:
        raise ProvisionError("not an OpenSSH public key line")
    blob = base64.b64decode(parts[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def fingerprint_of_key(public_key: ec.EllipticCurvePublicKey) -> str:
    """The OpenSSH-style fingerprint of a public key object."""
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return fingerprint(line)


def fingerprint_of_bytes(data: bytes) -> str | None:
    """The fingerprint of a public key given as OpenSSH, PEM or DER bytes (None if unreadable):
    how the SuperLink's node records are matched with the consortium's registry."""
    loaders = (serialization.load_ssh_public_key, serialization.load_pem_public_key,
               serialization.load_der_public_key)
    for load in loaders:
        try:
            key = load(data)
        except (ValueError, TypeError, IndexError, UnsupportedAlgorithm):
            continue
        if isinstance(key, ec.EllipticCurvePublicKey):
            return fingerprint_of_key(key)
    return None
