"""Private keys at rest: each encrypted with a passphrase of its own, decrypted only into memory.

Every private key fedmeta writes (the CA's, the coordinator's TLS key, each hospital's SuperNode
key) is PKCS#8 PEM encrypted with its own passphrase (``BestAvailableEncryption``: AES-256-CBC
under a key stretched by PBKDF2), unless an operator explicitly asks for plaintext keys. The
CA key's passphrase is a separate secret (``--ca-passphrase-file``, ``$FEDMETA_CA_PASSPHRASE``)
from the one of the key a host runs with (``--passphrase-file``, ``$FEDMETA_KEY_PASSPHRASE``);
a missing passphrase is an error, never another key's.

A passphrase comes from a file (first line, the file must not be readable by others) or from an
environment variable; :class:`Passphrase` says which, without holding the secret longer than
needed. When a Flower process needs a key it cannot decrypt itself (Flower reads key files as
plaintext), fedmeta decrypts it into an anonymous in-memory file (``memfd_create``) and hands the
child ``/dev/fd/N``: the plaintext never touches a disk and disappears with the processes.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmeta.common.errors import ProvisionError

#: Environment variable read for the passphrase of the key a host runs with (the coordinator's
#: TLS key, a site's SuperNode key) when no file is named.
PASSPHRASE_ENV = "FEDMETA_KEY_PASSPHRASE"
#: Environment variable read for the consortium CA key's passphrase when no file is named.
CA_PASSPHRASE_ENV = "FEDMETA_CA_PASSPHRASE"
#: Every variable fedmeta reads a passphrase from by default: never in a Flower process's environment.
PASSPHRASE_ENVS = (PASSPHRASE_ENV, CA_PASSPHRASE_ENV)
MIN_PASSPHRASE = 12


@dataclass(frozen=True)
class KeyRole:
    """Which key a passphrase unlocks, for the options that give it and for error messages."""

    what: str
    file_option: str = "--passphrase-file"
    env_option: str = "--passphrase-env"
    env: str = PASSPHRASE_ENV


#: The passphrase of the key this host runs with (generic: the CLI's ``--passphrase-*``).
HOST_KEY = KeyRole("the private key")
#: The coordinator's TLS key (``coordinator/server.key``).
COORDINATOR_KEY = KeyRole("the coordinator's TLS key")
#: The consortium CA key (``ca/ca.key``): its own options and variable.
CA_KEY = KeyRole("the consortium CA key", "--ca-passphrase-file", "--ca-passphrase-env", CA_PASSPHRASE_ENV)
#: A hospital's SuperNode key (``supernode.key``).
SITE_KEY = KeyRole("the site's key")


@dataclass(frozen=True)
class Passphrase:
    """Where a key passphrase comes from: ``file`` (its first line) or the variable ``env``.
    ``none`` means keys are (or will be) plaintext, which an operator must ask for explicitly."""

    file: Path | None = None
    env: str | None = None
    none: bool = False
    role: KeyRole = HOST_KEY

    @classmethod
    def from_options(cls, *, file: Path | None, env: str | None, plaintext: bool,
                     role: KeyRole = HOST_KEY) -> Passphrase:
        """The source named on a command line for ``role``'s key: a file, a variable, or
        plaintext keys; with nothing named, the role's variable (``$FEDMETA_KEY_PASSPHRASE``,
        ``$FEDMETA_CA_PASSPHRASE`` for the CA key) when it is set. Nothing else: a missing
        passphrase is an error naming the key, never another key's passphrase."""
        chosen = [x for x in (file is not None, env is not None, plaintext) if x]
        if len(chosen) > 1:
            raise ProvisionError(f"give one of {role.file_option}, {role.env_option}, --plaintext-keys")
        if plaintext:
            return cls(none=True, role=role)
        if file is not None:
            return cls(file=file, role=role)
        if env is not None:
            return cls(env=env, role=role)
        if os.environ.get(role.env):
            return cls(env=role.env, role=role)
        raise ProvisionError(
            f"{role.what} is encrypted with a passphrase of its own: give {role.file_option} FILE, "
            f"or set ${role.env} (or {role.env_option} NAME); --plaintext-keys writes keys "
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
                raise ProvisionError(f"{self.file}: cannot read the passphrase file of "
                                     f"{self.role.what}: {e}") from e
            if mode & (stat.S_IRWXG | stat.S_IRWXO) and not _systemd_credential(self.file):
                raise ProvisionError(
                    f"{self.file}: the passphrase file of {self.role.what} is readable by others (mode "
                    f"{stat.S_IMODE(mode):o}); chmod 600 it"
                )
            value = text.splitlines()[0] if text.strip() else ""
            where = str(self.file)
        else:
            assert self.env is not None
            value = os.environ.get(self.env, "")
            where = f"${self.env}"
        if not value:
            raise ProvisionError(f"{where}: no passphrase for {self.role.what} (empty or unset)")
        if len(value) < MIN_PASSPHRASE:
            raise ProvisionError(
                f"{where}: the passphrase of {self.role.what} must be at least {MIN_PASSPHRASE} characters"
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


def load_private_key(path: Path, passphrase: Passphrase, *, what: str | None = None) -> ec.EllipticCurvePrivateKey:
    """Read and decrypt an EC private key written by fedmeta; errors name the key (``what``,
    else the passphrase's role) and its file and say why (wrong passphrase, plaintext key where
    a passphrase was given, not a key), in one line."""
    what = what or passphrase.role.what
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ProvisionError(f"{path}: cannot read {what}: {e}") from e
    encrypted = b"ENCRYPTED PRIVATE KEY" in data[:64]
    secret = passphrase.read()
    if encrypted and secret is None:
        raise ProvisionError(f"{path}: {what} is encrypted; give its passphrase")
    key: object
    try:
        if b"OPENSSH PRIVATE KEY" in data[:64]:
            key = serialization.load_ssh_private_key(data, password=secret if encrypted else None)
        else:
            key = serialization.load_pem_private_key(data, password=secret if encrypted else None)
    except (ValueError, TypeError) as e:
        reason = f"wrong passphrase ({passphrase.describe()}) or damaged key" if encrypted else str(e)
        raise ProvisionError(f"{path}: cannot load {what}: {reason}") from None
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


def decrypted_pem(path: Path, passphrase: Passphrase, *, openssh: bool = False,
                  what: str | None = None) -> MemoryFile:
    """``path``'s key decrypted into memory, as PKCS#8 PEM (TLS) or OpenSSH (SuperNode
    authentication), for a child process to read from ``/dev/fd/N``."""
    key = load_private_key(path, passphrase, what=what)
    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    return MemoryFile(path.name, data)


def fresh_passphrase(avoid: Iterable[bytes] = ()) -> bytes:
    """A new random passphrase (32 bytes from the operating system's CSPRNG, as URL-safe text),
    equal to none of ``avoid`` (the CA's, the coordinator's, the other keys' passphrases)."""
    taken = set(avoid)
    for _ in range(3):
        value = secrets.token_urlsafe(32).encode("ascii")
        if value not in taken:
            return value
    raise ProvisionError("could not draw a passphrase different from the other keys'")


def write_passphrase_file(path: Path, value: bytes) -> None:
    """Write a passphrase (one line) to ``path``, created 0600 and never over an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as e:
        raise ProvisionError(f"{path}: refusing to overwrite an existing passphrase file") from e
    with os.fdopen(fd, "wb") as f:
        f.write(value + b"\n")
    os.chmod(path, 0o600)


def secure_folder(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700: owner only."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def owner_only(path: Path) -> None:
    """Make an existing file 0600 (folders 0700)."""
    os.chmod(path, 0o700 if path.is_dir() else 0o600)
