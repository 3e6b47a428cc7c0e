"""Private keys at rest: encrypted with a passphrase, decrypted only into memory.

Every private key fedmeta writes (the CA's, the coordinator's TLS key, each hospital's SuperNode
key) is PKCS#8 PEM encrypted with the passphrase (``BestAvailableEncryption``: AES-256-CBC
under a key stretched by PBKDF2), unless an operator explicitly asks for plaintext keys.

A passphrase comes from a file (first line, the file must not be readable by others) or from an
environment variable; :class:`Passphrase` says which, without holding the secret longer than
needed. When a Flower process needs a key it cannot decrypt itself (Flower reads key files as
plaintext), fedmeta decrypts it into an anonymous in-memory file (``memfd_create``) and hands the
child ``/dev/fd/N``: the plaintext never touches a disk and disappears with the processes.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmeta.common.errors import ProvisionError

#: Environment variable read for the key passphrase when no file is named.
PASSPHRASE_ENV = "FEDMETA_KEY_PASSPHRASE"
MIN_PASSPHRASE = 12


@dataclass(frozen=True)
class Passphrase:
    """Where a key passphrase comes from: ``file`` (its first line) or the variable ``env``.
    ``none`` means keys are (or will be) plaintext, which an operator must ask for explicitly."""

    file: Path | None = None
    env: str | None = None
    none: bool = False

    @classmethod
    def from_options(cls, *, file: Path | None, env: str | None, plaintext: bool) -> Passphrase:
        """The source named on a command line: a file, a variable, or plaintext keys; with
        nothing named, ``$FEDMETA_KEY_PASSPHRASE`` when it is set."""
        chosen = [x for x in (file is not None, env is not None, plaintext) if x]
        if len(chosen) > 1:
            raise ProvisionError("give one of --passphrase-file, --passphrase-env, --plaintext-keys")
        if plaintext:
            return cls(none=True)
        if file is not None:
            return cls(file=file)
        if env is not None:
            return cls(env=env)
        if os.environ.get(PASSPHRASE_ENV):
            return cls(env=PASSPHRASE_ENV)
        raise ProvisionError(
            "private keys are encrypted with a passphrase: give --passphrase-file FILE, or set "
            f"${PASSPHRASE_ENV} (or --passphrase-env NAME); --plaintext-keys writes them "
            "unencrypted (test machines only)"
        )

    def read(self) -> bytes | None:
        """The passphrase's bytes (None for plaintext keys)."""
        if self.none:
            return None
        if self.file is not None:
            try:
                mode = self.file.stat().st_mode
                text = self.file.read_text(encoding="utf-8")
            except OSError as e:
                raise ProvisionError(f"{self.file}: cannot read the passphrase file: {e}") from e
            if mode & (stat.S_IRWXG | stat.S_IRWXO) and not _systemd_credential(self.file):
                raise ProvisionError(
                    f"{self.file}: the passphrase file is readable by others (mode "
                    f"{stat.S_IMODE(mode):o}); chmod 600 it"
                )
            value = text.splitlines()[0] if text.strip() else ""
            where = str(self.file)
        else:
            assert self.env is not None
            value = os.environ.get(self.env, "")
            where = f"${self.env}"
        if len(value) < MIN_PASSPHRASE:
            raise ProvisionError(
                f"{where}: the key passphrase must be at least {MIN_PASSPHRASE} characters"
            )
        return value.encode("utf-8")

    def describe(self) -> str:
        if self.none:
            return "plaintext keys"
        return f"passphrase from {self.file}" if self.file is not None else f"passphrase from ${self.env}"


def _systemd_credential(path: Path) -> bool:
    """Whether ``path`` is a systemd credential of this service: a file in
    ``$CREDENTIALS_DIRECTORY``, which systemd makes readable by the service's user only (on file
    systems with ACLs it grants that user an ACL entry, so the mode shows group bits)."""
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if not folder:
        return False
    try:
        return path.resolve().parent == Path(folder).resolve()
    except OSError:
        return False


def private_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None) -> bytes:
    """PKCS#8 PEM of ``key``: encrypted with ``passphrase``, plaintext when it is None."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase is not None
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def is_encrypted(path: Path) -> bool:
    """Whether ``path`` holds an encrypted PKCS#8 PEM key."""
    try:
        return b"BEGIN ENCRYPTED PRIVATE KEY" in path.read_bytes()[:64]
    except OSError as e:
        raise ProvisionError(f"{path}: cannot read the key file: {e}") from e


def load_private_key(path: Path, passphrase: Passphrase) -> ec.EllipticCurvePrivateKey:
    """Read and decrypt an EC private key written by fedmeta; errors name the file and say why
    (wrong passphrase, plaintext key where a passphrase was given, not a key)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ProvisionError(f"{path}: cannot read the key file: {e}") from e
    encrypted = b"ENCRYPTED PRIVATE KEY" in data[:64]
    secret = passphrase.read()
    if encrypted and secret is None:
        raise ProvisionError(f"{path}: the key is encrypted; give its passphrase")
    key: object
    try:
        if b"OPENSSH PRIVATE KEY" in data[:64]:
            key = serialization.load_ssh_private_key(data, password=secret if encrypted else None)
        else:
            key = serialization.load_pem_private_key(data, password=secret if encrypted else None)
    except (ValueError, TypeError) as e:
        reason = "wrong passphrase or damaged key" if encrypted else str(e)
        raise ProvisionError(f"{path}: cannot load the private key: {reason}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProvisionError(f"{path}: expected an EC private key, got {type(key).__name__}")
    return key


class MemoryFile:
    """Bytes in an anonymous in-memory file, readable by child processes as ``/dev/fd/N``.

    Pass :attr:`fd` in ``pass_fds`` when starting the child and give it :attr:`path`. Closing
    (or the ``with`` block's end) releases the memory; children keep their inherited copy.
    """

    def __init__(self, name: str, data: bytes) -> None:
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.write(self.fd, data)
        os.lseek(self.fd, 0, os.SEEK_SET)

    @property
    def path(self) -> str:
        return f"/dev/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> MemoryFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decrypted_pem(path: Path, passphrase: Passphrase, *, openssh: bool = False) -> MemoryFile:
    """``path``'s key decrypted into memory, as PKCS#8 PEM (TLS) or OpenSSH (SuperNode
    authentication), for a child process to read from ``/dev/fd/N``."""
    key = load_private_key(path, passphrase)
    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    return MemoryFile(path.name, data)


def secure_folder(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700: owner only."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def owner_only(path: Path) -> None:
    """Make an existing file 0600 (folders 0700)."""
    os.chmod(path, 0o700 if path.is_dir() else 0o600)
