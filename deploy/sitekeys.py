"""SuperNode authentication keys: one EC P-384 key pair per hospital, in OpenSSH format.

Flower's SuperLink (``--enable-supernode-auth``) admits a SuperNode only if the public key it signs
with was registered beforehand (``flwr supernode register KEY.pub``); the SuperNode reads its
private key with ``--auth-supernode-private-key``. Flower requires NIST EC curves in OpenSSH
encoding for the public key; the private key is written as encrypted PKCS#8 PEM (mode 0o600,
:mod:`fedmeta.deploy.secrets`) and handed to the SuperNode decrypted, in memory, in OpenSSH form.
The public key and its SHA-256 fingerprint are what the coordinator keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmeta.common.errors import ProvisionError
from fedmeta.deploy.certs import CURVE, write_private_bytes, write_public_bytes
from fedmeta.deploy.secrets import private_pem
from fedmeta.protocol.fingerprint import fingerprint, fingerprint_of_bytes, fingerprint_of_key

__all__ = ["SiteKeyPaths", "fingerprint", "fingerprint_of_bytes", "fingerprint_of_key", "load_public_key",
           "make_site_keys"]


@dataclass(frozen=True)
class SiteKeyPaths:
    """Where a site's key pair lives and the public key's fingerprint (``SHA256:<base64>``)."""

    private: Path
    public: Path
    fingerprint: str


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
