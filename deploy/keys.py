"""SuperNode authentication keys: one EC P-384 key pair per hospital, in OpenSSH format.

Flower's SuperLink (``--enable-supernode-auth``) admits a SuperNode only if the public key it signs
with was registered beforehand (``flwr supernode register KEY.pub``); the SuperNode reads its
private key with ``--auth-supernode-private-key``. Flower requires NIST EC curves in OpenSSH
encoding for the public key; the private key is written as encrypted PKCS#8 PEM (mode 0o600,
:mod:`fedmeta.deploy.secrets`) and handed to the SuperNode decrypted, in memory, in OpenSSH form.
The public key and its SHA-256 fingerprint are what the coordinator keeps.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmeta.common.errors import ProvisionError
from fedmeta.deploy.certs import CURVE, write_private_bytes, write_public_bytes
from fedmeta.deploy.secrets import private_pem


@dataclass(frozen=True)
class SiteKeyPaths:
    """Where a site's key pair lives and the public key's fingerprint (``SHA256:<base64>``)."""

    private: Path
    public: Path
    fingerprint: str


def fingerprint(public_openssh: bytes) -> str:
    """OpenSSH-style fingerprint: ``SHA256:`` + unpadded base64 of the SHA-256 of the key blob."""
    parts = public_openssh.split()
    if len(parts) < 2:
        raise ProvisionError("not an OpenSSH public key line")
    blob = base64.b64decode(parts[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def make_site_keys(folder: Path, *, comment: str, passphrase: bytes | None) -> SiteKeyPaths:
    """Generate an EC key pair and write ``supernode.key`` (0o600, encrypted with ``passphrase``
    unless it is None) and ``supernode.pub`` (OpenSSH)."""
    key = ec.generate_private_key(CURVE)
    private = private_pem(key, passphrase)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public_line = public + b" " + comment.encode("ascii") + b"\n"
    paths = SiteKeyPaths(
        private=folder / "supernode.key",
        public=folder / "supernode.pub",
        fingerprint=fingerprint(public),
    )
    write_private_bytes(paths.private, private)
    write_public_bytes(paths.public, public_line)
    return paths


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load an OpenSSH EC public key; anything else is refused."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ProvisionError(f"{path}: not a readable OpenSSH public key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ProvisionError(f"{path}: expected an EC public key, got {type(key).__name__}")
    return key


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
