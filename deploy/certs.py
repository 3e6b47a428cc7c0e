"""X.509 material for a consortium: the CA, the coordinator's TLS certificate, and their checks.

Every certificate uses NIST P-384 keys and SHA-384 signatures. Serial numbers come from
:func:`cryptography.x509.random_serial_number` (the operating system's CSPRNG, as ``secrets``),
validity windows are time-zone-aware UTC datetimes, and private keys are written with mode 0o600
before any byte of key material reaches the disk, encrypted with the operator's passphrase
(:mod:`fedmeta.deploy.secrets`) unless plaintext keys were asked for.

The CA carries a critical ``BasicConstraints(ca=True, path_length=0)`` and a critical ``KeyUsage``
allowing only certificate and CRL signing; the server certificate is a leaf
(``BasicConstraints(ca=False)``) for ``digitalSignature`` and ``serverAuth`` with the coordinator's
DNS names and IP addresses as ``SubjectAlternativeName`` entries.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmeta.common.errors import ProvisionError
from fedmeta.deploy.secrets import Passphrase, load_private_key, private_pem

log = logging.getLogger(__name__)

CURVE = ec.SECP384R1()
HASH = hashes.SHA384()
PRIVATE_MODE = 0o600
# Backdating absorbs small clock differences between the coordinator and the hospitals.
CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, in memory."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        ]
    )


def make_ca(*, common_name: str, organization: str, validity_days: int) -> Issued:
    """Create a self-signed consortium CA (EC P-384) valid for ``validity_days`` days."""
    if validity_days <= 0:
        raise ProvisionError(f"CA validity_days must be > 0, got {validity_days}")
    key = ec.generate_private_key(CURVE)
    name = _name(common_name, organization)
    start = _now() - CLOCK_SKEW
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, HASH)
    )
    return Issued(cert=cert, key=key)


def _san_entries(sans: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for value in sans:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(value)))
        except ValueError:
            entries.append(x509.DNSName(value))
    return entries


def make_server_cert(
    ca: Issued, *, common_name: str, organization: str, sans: list[str], validity_days: int
) -> Issued:
    """Issue the coordinator's TLS server certificate, signed by ``ca``, for ``sans``.

    Entries of ``sans`` that parse as IP addresses become ``IPAddress`` names, the others
    ``DNSName``. The validity is cut to the CA's own end date if it would outlive the CA.
    """
    if not sans:
        raise ProvisionError("the server certificate needs at least one subjectAltName")
    if validity_days <= 0:
        raise ProvisionError(f"server validity_days must be > 0, got {validity_days}")
    key = ec.generate_private_key(CURVE)
    start = _now() - CLOCK_SKEW
    end = min(start + dt.timedelta(days=validity_days), ca.cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, organization))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_san_entries(sans)), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, HASH)
    )
    return Issued(cert=cert, key=key)


def write_private_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0o600, created so, never world-readable on the way.

    An existing file is refused: keys are never silently overwritten.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    except FileExistsError as e:
        raise ProvisionError(f"{path}: refusing to overwrite an existing private key") from e
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, PRIVATE_MODE)  # umask may have removed bits; never adds any beyond 0o600


def write_public_bytes(path: Path, data: bytes) -> None:
    """Write public material (certificates, public keys) with mode 0o644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o644)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_issued(issued: Issued, cert_path: Path, key_path: Path, *, passphrase: bytes | None) -> None:
    """Write a certificate (0o644) and its private key (0o600, encrypted with ``passphrase``
    unless it is None)."""
    write_private_bytes(key_path, private_pem(issued.key, passphrase))
    write_public_bytes(cert_path, cert_pem(issued.cert))


def load_issued(cert_path: Path, key_path: Path, passphrase: Passphrase) -> Issued:
    """Read back a certificate and key written by :func:`write_issued`."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as e:
        raise ProvisionError(f"cannot load {cert_path}: {e}") from e
    return Issued(cert=cert, key=load_private_key(key_path, passphrase))


def verify_chain(leaf: x509.Certificate, ca: x509.Certificate, *, hostname: str) -> None:
    """Verify ``leaf`` against the trust anchor ``ca`` for ``hostname`` (DNS name or IP).

    Uses :mod:`cryptography`'s RFC 5280 path validation; raises :class:`ProvisionError` with
    the verifier's reason when the chain, the validity window or the name does not check out.
    """
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    try:
        subject: x509.verification.Subject
        try:
            subject = x509.IPAddress(ipaddress.ip_address(hostname))
        except ValueError:
            subject = x509.DNSName(hostname)
        verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
        verifier.verify(leaf, [])
    except VerificationError as e:
        raise ProvisionError(f"certificate chain check failed for {hostname!r}: {e}") from e
