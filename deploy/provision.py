"""``fedmeta provision``: the consortium's CA, the coordinator's certificate and the site bundles.

Runs as ordered builders over one output folder (after NVFlare's provisioning): CA, then the
coordinator, then one bundle per hospital, then the registry. The output folder::

    DIR/
      registry.json              which sites exist, their key fingerprints, active or revoked
      ca/ca.crt ca/ca.key        consortium CA (keep ca.key offline after provisioning)
      coordinator/               ca.crt, server.crt, server.key (0600), coordinator.json (ports),
                                 authorized/<site>.pub
      sites/<site>/              the bundle shipped to a hospital: ca.crt, supernode.pub,
                                 node.yaml (and supernode.key, 0600, only with ``site_keys``)
      passphrases/<site>.pass    with ``site_keys`` only: that key's own random passphrase
                                 (0600), handed over apart from the bundle, then deleted

Each key has its own passphrase: the CA key's (``ca_passphrase``) and the coordinator key's
(``passphrase``) are separate secrets and must differ. A hospital makes its own key pair by
default (``fedmeta site keygen``) and sends only its public key (``public_key:`` of its entry
in ``consortium.yaml``, or ``--add-site NAME --public-key FILE`` later); its private key and
passphrase never leave it. A site without a public key is left out of the registry until it
sends one. Only when asked (``site_keys``) does provisioning make a hospital's key itself, each
encrypted with a fresh random passphrase written beside the bundles, never the same twice.

``registry.json`` is signed with the consortium CA's key whenever it is written (provisioning,
``--add-site``, ``--revoke``) and checked against the CA certificate (``coordinator/ca.crt``)
wherever it is read (:meth:`Registry.load`, which the coordinator's reconciliation and the
ServerApp's naming of nodes both use): a registry changed by anyone but the CA key's holder is an
error naming the file, never a fallback. A revocation on the coordinator host, which does not
hold the CA key, goes to ``revocations.json`` beside it (:func:`record_revocation`): it can only
take a site out, never let one in.

A hospital's identity is its SuperNode key pair; the coordinator admits it by registering the
public key with the SuperLink. Adding a hospital therefore needs neither the CA key nor any change
to the other hospitals, and revoking one means unregistering its key (``fedmeta provision
--revoke NAME`` marks it; a running coordinator is told by ``fedmeta coordinator revoke``).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from fedmeta.common.errors import ProvisionError
from fedmeta.common.extras import installed_version
from fedmeta.deploy.certs import (
    Issued,
    make_ca,
    make_server_cert,
    verify_chain,
    write_issued,
    write_public_bytes,
)
from fedmeta.deploy.consortium import Consortium, SiteSettings
from fedmeta.deploy.node import NODE_FILE, render_node_yaml
from fedmeta.deploy.secrets import (
    CA_KEY,
    Passphrase,
    fresh_passphrase,
    load_private_key,
    secure_folder,
    write_passphrase_file,
)
from fedmeta.deploy.sitekeys import fingerprint, load_public_key, make_site_keys
from fedmeta.protocol.registry import (
    REGISTRY,
    REVOCATIONS,
    SIGNATURE,
    SIGNATURE_HASH,
    SiteRecord,
    canonical,
    revocations,
)
from fedmeta.protocol.registry import Registry as SignedRegistry

log = logging.getLogger(__name__)

__all__ = ["PASSPHRASES", "REGISTRY", "REVOCATIONS", "Registry", "SiteRecord", "add_site", "pending_sites",
           "provision", "record_revocation", "revoke_site"]

#: Beside the bundles: the passphrase of each site key provisioning made (``site_keys``), 0600.
PASSPHRASES = "passphrases"


@dataclass
class Registry(SignedRegistry):
    """``registry.json``: the consortium's sites; rewritten atomically, and signed with the
    consortium CA's key, on every change (read and checked by :mod:`fedmeta.protocol.registry`)."""

    def save(self, out: Path, ca_passphrase: Passphrase) -> None:
        """Write ``registry.json`` signed with the consortium CA's key (``out/ca/ca.key``),
        decrypted with the CA key's own passphrase."""
        path = out / REGISTRY
        key = ca_signing_key(out, ca_passphrase)
        doc: dict[str, Any] = {
            "consortium": self.consortium,
            "created_at": self.created_at,
            "sites": {k: asdict(v) for k, v in self.sites.items()},
        }
        doc[SIGNATURE] = base64.b64encode(key.sign(canonical(doc), ec.ECDSA(SIGNATURE_HASH))).decode("ascii")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def ca_signing_key(out: Path, ca_passphrase: Passphrase) -> ec.EllipticCurvePrivateKey:
    """The consortium CA's key (``out/ca/ca.key``), decrypted with its own passphrase; a missing
    key or a wrong passphrase is an error naming the CA key."""
    ca_key = out / "ca" / "ca.key"
    if not ca_key.is_file():
        raise ProvisionError(f"{ca_key}: the consortium CA key signs registry.json; bring it back "
                             "from offline storage to change the registry")
    return load_private_key(ca_key, ca_passphrase, what=CA_KEY.what)


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _build_ca(consortium: Consortium, out: Path, secret: bytes | None) -> Issued:
    ca = make_ca(
        common_name=consortium.ca.common_name,
        organization=consortium.name,
        validity_days=consortium.ca.validity_days,
    )
    (out / "ca").mkdir(parents=True)
    os.chmod(out / "ca", 0o700)
    write_issued(ca, out / "ca" / "ca.crt", out / "ca" / "ca.key", passphrase=secret)
    return ca


def _build_coordinator(consortium: Consortium, out: Path, ca: Issued, secret: bytes | None) -> None:
    co = consortium.coordinator
    server = make_server_cert(
        ca,
        common_name=co.host,
        organization=consortium.name,
        sans=list(co.sans),
        validity_days=co.validity_days,
    )
    folder = out / "coordinator"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    write_issued(server, folder / "server.crt", folder / "server.key", passphrase=secret)
    shutil.copyfile(out / "ca" / "ca.crt", folder / "ca.crt")
    (folder / "coordinator.json").write_text(
        json.dumps(
            {"host": co.host, "sans": list(co.sans), "fleet_port": co.fleet_port,
             "control_port": co.control_port},
            indent=2,
        ) + "\n",
        encoding="utf-8",
    )
    for name in co.sans:
        verify_chain(server.cert, ca.cert, hostname=name)


#: The data a bundle's node serves when the consortium file gives only a partition number: that
#: hospital of the bundled Fed-Heart-Disease demonstration data.
DEMO_SOURCE = "fed-heart"


def _node_data(site: SiteSettings) -> str | dict[str, object] | None:
    if site.site_config is not None:
        return site.site_config
    if site.partition_id is not None:
        return {"source": DEMO_SOURCE, "partition": site.partition_id}
    return None


def _site_passphrases(out: Path) -> list[bytes]:
    """The passphrases of the site keys provisioning made earlier (still awaiting hand-over)."""
    folder = out / PASSPHRASES
    if not folder.is_dir():
        return []
    return [f.read_bytes().splitlines()[0] for f in sorted(folder.glob("*.pass")) if f.read_bytes().strip()]


def _build_site(consortium: Consortium, out: Path, site: SiteSettings, registry: Registry, *,
                public_key: Path | None, key_secret: bytes | None, plaintext: bool) -> Path:
    """One hospital's bundle: with ``public_key`` (the hospital's own), or else a key pair made
    here, encrypted with ``key_secret`` (its own passphrase; None with ``plaintext``)."""
    if site.name in registry.sites:
        raise ProvisionError(
            f"{out / REGISTRY}: site {site.name!r} already provisioned "
            f"(status {registry.sites[site.name].status}); pick a new name to re-admit a hospital"
        )
    bundle = out / "sites" / site.name
    if bundle.exists():
        raise ProvisionError(f"{bundle}: bundle folder already exists; refusing to overwrite")
    bundle.mkdir(parents=True)
    os.chmod(bundle, 0o700)
    if public_key is not None:  # the hospital made its own key pair; only the public key came
        load_public_key(public_key)
        public = public_key.read_text(encoding="ascii")
        write_public_bytes(bundle / "supernode.pub", public.encode())
        fp = fingerprint(public.encode())
    else:
        if key_secret is None and not plaintext:
            raise ProvisionError(f"site {site.name!r}: a key made here needs a passphrase of its own")
        keys = make_site_keys(bundle, comment=f"fedmeta-{consortium.name}-{site.name}",
                              passphrase=key_secret)
        if key_secret is not None:
            secure_folder(out / PASSPHRASES)
            write_passphrase_file(out / PASSPHRASES / f"{site.name}.pass", key_secret)
        public = keys.public.read_text(encoding="ascii")
        fp = keys.fingerprint
    shutil.copyfile(out / "ca" / "ca.crt", bundle / "ca.crt")
    (bundle / NODE_FILE).write_text(
        render_node_yaml(
            site=site.name,
            superlink=consortium.coordinator.fleet_address,
            runtime_port=site.runtime_port,
            data=_node_data(site),
            version=installed_version(),
            plaintext_key=public_key is None and plaintext,
        ),
        encoding="utf-8",
    )
    write_public_bytes(out / "coordinator" / "authorized" / f"{site.name}.pub", public.encode())
    registry.sites[site.name] = SiteRecord(
        name=site.name, fingerprint=fp, public_key=public.strip(), issued_at=_now_iso(),
    )
    log.info("provisioned site %s (key %s) in %s", site.name, fp, bundle)
    return bundle


def _distinct(ca_secret: bytes | None, co_secret: bytes | None, ca_passphrase: Passphrase,
              passphrase: Passphrase) -> None:
    if ca_secret is not None and ca_secret == co_secret:
        raise ProvisionError(
            f"the consortium CA key's passphrase ({ca_passphrase.describe()}) is the coordinator key's "
            f"({passphrase.describe()}): give the CA key a passphrase of its own "
            "(--ca-passphrase-file or $FEDMETA_CA_PASSPHRASE)"
        )


def pending_sites(consortium: Consortium, registry: Registry) -> list[str]:
    """Sites of ``consortium`` not yet in the registry (awaiting their public key)."""
    return [s.name for s in consortium.sites if s.name not in registry.sites]


def provision(consortium: Consortium, out: Path, *, ca_passphrase: Passphrase, passphrase: Passphrase,
              site_keys: bool = False) -> Registry:
    """Create a new consortium in the empty (or missing) folder ``out``: the CA (its key
    encrypted with ``ca_passphrase``), the coordinator (its key encrypted with ``passphrase``,
    which must differ), and a bundle for each site that gave its public key (``public_key:``).
    With ``site_keys`` the other sites' key pairs are made here, each with a fresh random
    passphrase in ``out/passphrases/<site>.pass``; without, they are left out until they send
    their public key (:func:`add_site`). Both passphrases are read before anything is written."""
    if (out / REGISTRY).exists() or (out / "ca").exists():
        raise ProvisionError(
            f"{out}: already provisioned; use --add-site NAME or --revoke NAME to change it"
        )
    if ca_passphrase.none != passphrase.none:
        raise ProvisionError("plaintext keys are all or nothing: the CA's and the coordinator's alike")
    ca_secret, co_secret = ca_passphrase.read(), passphrase.read()
    _distinct(ca_secret, co_secret, ca_passphrase, passphrase)
    public_keys = {s.name: consortium.public_key(s) for s in consortium.sites}
    for path in public_keys.values():
        if path is not None:
            load_public_key(path)  # every given public key is checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    ca = _build_ca(consortium, out, ca_secret)
    _build_coordinator(consortium, out, ca, co_secret)
    registry = Registry(consortium=consortium.name, created_at=_now_iso(), sites={})
    used = [x for x in (ca_secret, co_secret) if x is not None]
    for site in consortium.sites:
        public_key = public_keys[site.name]
        if public_key is None and not site_keys:
            continue
        secret = None
        if public_key is None and not passphrase.none:
            secret = fresh_passphrase(used)
            used.append(secret)
        _build_site(consortium, out, site, registry, public_key=public_key, key_secret=secret,
                    plaintext=passphrase.none)
    registry.save(out, ca_passphrase)
    log.info(
        "provisioned consortium %s: CA, coordinator %s, %d of %d sites in %s",
        consortium.name, consortium.coordinator.host, len(registry.sites), len(consortium.sites), out,
    )
    return registry


def add_site(consortium: Consortium, out: Path, name: str, *, ca_passphrase: Passphrase,
             public_key: Path | None = None, site_keys: bool = False) -> Path:
    """Issue the bundle of one new hospital (listed in ``consortium``); others are untouched.
    The hospital's own public key (``public_key``, else its ``public_key:`` in the consortium
    file) is registered; only with ``site_keys`` is a key pair made here instead, encrypted with
    a fresh random passphrase (``out/passphrases/NAME.pass``). The registry is re-signed with
    the CA key (``ca_passphrase``)."""
    registry = Registry.load(out)
    if registry.consortium != consortium.name:
        raise ProvisionError(
            f"{consortium.source}: consortium {consortium.name!r} does not match "
            f"{out / REGISTRY} ({registry.consortium!r})"
        )
    site = consortium.site(name)
    public_key = public_key or consortium.public_key(site)
    if public_key is not None and site_keys:
        raise ProvisionError(f"site {name!r}: give its public key or --site-keys, not both")
    if public_key is None and not site_keys:
        raise ProvisionError(
            f"site {name!r}: give --public-key FILE (the supernode.pub the hospital made with "
            "`fedmeta site keygen`), or --site-keys to make its key pair here"
        )
    ca_signing_key(out, ca_passphrase)  # before anything is written: a wrong passphrase changes nothing
    ca_secret = ca_passphrase.read()
    secret = None
    if public_key is None and not ca_passphrase.none:
        secret = fresh_passphrase([*([ca_secret] if ca_secret else []), *_site_passphrases(out)])
    bundle = _build_site(consortium, out, site, registry, public_key=public_key, key_secret=secret,
                         plaintext=ca_passphrase.none)
    registry.save(out, ca_passphrase)
    return bundle


def revoke_site(out: Path, name: str, *, reason: str, ca_passphrase: Passphrase) -> SiteRecord:
    """Mark a hospital revoked (the registry re-signed with the CA key, decrypted with its own
    passphrase) and delete the copy of its private key and of its passphrase kept in ``out``
    (``site_keys`` only).

    The coordinator stops admitting it once its key is unregistered from the SuperLink
    (:func:`fedmeta.deploy.launch.unregister_site`, run by ``fedmeta coordinator revoke``);
    a coordinator started later never registers a revoked key.
    """
    registry = Registry.load(out)
    if name not in registry.sites:
        raise ProvisionError(
            f"{out / REGISTRY}: no site named {name!r} (known: {sorted(registry.sites)})"
        )
    record = registry.sites[name]
    if record.status == "revoked":
        raise ProvisionError(f"{out / REGISTRY}: site {name!r} is already revoked")
    record.status = "revoked"
    record.revoked_at = _now_iso()
    record.reason = reason
    registry.save(out, ca_passphrase)
    (out / "sites" / name / "supernode.key").unlink(missing_ok=True)
    (out / PASSPHRASES / f"{name}.pass").unlink(missing_ok=True)
    (out / "coordinator" / "authorized" / f"{name}.pub").unlink(missing_ok=True)
    log.info("revoked site %s (key %s): %s", name, record.fingerprint, reason)
    return record


def record_revocation(out: Path, name: str, *, reason: str) -> SiteRecord:
    """Revoke a hospital on the coordinator host, which does not hold the CA key: the signed
    registry is left as it is and the site goes to ``revocations.json`` (read with it by
    :meth:`Registry.load`; it can only take sites out). Its stored public key is deleted. The
    operator revokes it in the signed registry too (``fedmeta provision --revoke``)."""
    registry = Registry.load(out)
    if name not in registry.sites:
        raise ProvisionError(f"{out / REGISTRY}: no site named {name!r} (known: {sorted(registry.sites)})")
    record = registry.sites[name]
    if record.status == "revoked":
        raise ProvisionError(f"{out / REGISTRY}: site {name!r} is already revoked")
    revoked = {**revocations(out), name: reason}
    path = out / REVOCATIONS
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(revoked, indent=2) + "\n", encoding="utf-8")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    (out / "coordinator" / "authorized" / f"{name}.pub").unlink(missing_ok=True)
    record.status, record.reason = "revoked", reason
    log.info("revoked site %s (key %s) on this coordinator: %s", name, record.fingerprint, reason)
    return record
