"""``fedmeta provision``: the consortium's CA, the coordinator's certificate and the site bundles.

Runs as ordered builders over one output folder (after NVFlare's provisioning): CA, then the
coordinator, then one bundle per hospital, then the registry. The output folder::

    DIR/
      registry.json              which sites exist, their key fingerprints, active or revoked
      ca/ca.crt ca/ca.key        consortium CA (keep ca.key offline after provisioning)
      coordinator/               ca.crt, server.crt, server.key (0600), coordinator.json (ports),
                                 authorized/<site>.pub
      sites/<site>/              the bundle shipped to a hospital: ca.crt, supernode.key (0600),
                                 supernode.pub, node.yaml

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
from fedmeta.deploy.certs import (
    load_issued,
    make_ca,
    make_server_cert,
    verify_chain,
    write_issued,
    write_public_bytes,
)
from fedmeta.deploy.consortium import Consortium, SiteSettings
from fedmeta.deploy.node import NODE_FILE, render_node_yaml
from fedmeta.deploy.secrets import Passphrase, load_private_key
from fedmeta.deploy.sitekeys import fingerprint, load_public_key, make_site_keys
from fedmeta.protocol.app import installed_version
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

__all__ = ["REGISTRY", "REVOCATIONS", "Registry", "SiteRecord", "add_site", "provision", "record_revocation",
           "revoke_site"]


@dataclass
class Registry(SignedRegistry):
    """``registry.json``: the consortium's sites; rewritten atomically, and signed with the
    consortium CA's key, on every change (read and checked by :mod:`fedmeta.protocol.registry`)."""

    def save(self, out: Path, passphrase: Passphrase) -> None:
        """Write ``registry.json`` signed with the consortium CA's key (``out/ca/ca.key``)."""
        path = out / REGISTRY
        ca_key = out / "ca" / "ca.key"
        if not ca_key.is_file():
            raise ProvisionError(f"{ca_key}: the consortium CA key signs registry.json; bring it back "
                                 "from offline storage to change the registry")
        key = load_private_key(ca_key, passphrase)
        doc: dict[str, Any] = {
            "consortium": self.consortium,
            "created_at": self.created_at,
            "sites": {k: asdict(v) for k, v in self.sites.items()},
        }
        doc[SIGNATURE] = base64.b64encode(key.sign(canonical(doc), ec.ECDSA(SIGNATURE_HASH))).decode("ascii")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _build_ca(consortium: Consortium, out: Path, secret: bytes | None) -> None:
    ca = make_ca(
        common_name=consortium.ca.common_name,
        organization=consortium.name,
        validity_days=consortium.ca.validity_days,
    )
    (out / "ca").mkdir(parents=True)
    os.chmod(out / "ca", 0o700)
    write_issued(ca, out / "ca" / "ca.crt", out / "ca" / "ca.key", passphrase=secret)


def _build_coordinator(consortium: Consortium, out: Path, passphrase: Passphrase) -> None:
    ca = load_issued(out / "ca" / "ca.crt", out / "ca" / "ca.key", passphrase)
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
    write_issued(server, folder / "server.crt", folder / "server.key", passphrase=passphrase.read())
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


def _build_site(consortium: Consortium, out: Path, site: SiteSettings, registry: Registry, *,
                passphrase: Passphrase, public_key: Path | None = None) -> Path:
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
        keys = make_site_keys(bundle, comment=f"fedmeta-{consortium.name}-{site.name}",
                              passphrase=passphrase.read())
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
            plaintext_key=passphrase.none,
        ),
        encoding="utf-8",
    )
    write_public_bytes(out / "coordinator" / "authorized" / f"{site.name}.pub", public.encode())
    registry.sites[site.name] = SiteRecord(
        name=site.name, fingerprint=fp, public_key=public.strip(), issued_at=_now_iso(),
    )
    log.info("provisioned site %s (key %s) in %s", site.name, fp, bundle)
    return bundle


def provision(consortium: Consortium, out: Path, *, passphrase: Passphrase) -> Registry:
    """Create a new consortium in the empty (or missing) folder ``out``."""
    if (out / REGISTRY).exists() or (out / "ca").exists():
        raise ProvisionError(
            f"{out}: already provisioned; use --add-site NAME or --revoke NAME to change it"
        )
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    secret = passphrase.read()
    _build_ca(consortium, out, secret)
    _build_coordinator(consortium, out, passphrase)
    registry = Registry(consortium=consortium.name, created_at=_now_iso(), sites={})
    for site in consortium.sites:
        _build_site(consortium, out, site, registry, passphrase=passphrase)
    registry.save(out, passphrase)
    log.info(
        "provisioned consortium %s: CA, coordinator %s, %d sites in %s",
        consortium.name, consortium.coordinator.host, len(consortium.sites), out,
    )
    return registry


def add_site(consortium: Consortium, out: Path, name: str, *, passphrase: Passphrase,
             public_key: Path | None = None) -> Path:
    """Issue the bundle of one new hospital (listed in ``consortium``); others are untouched.
    With ``public_key`` the hospital keeps its own private key: only the public key is used."""
    registry = Registry.load(out)
    if registry.consortium != consortium.name:
        raise ProvisionError(
            f"{consortium.source}: consortium {consortium.name!r} does not match "
            f"{out / REGISTRY} ({registry.consortium!r})"
        )
    bundle = _build_site(consortium, out, consortium.site(name), registry, passphrase=passphrase,
                         public_key=public_key)
    registry.save(out, passphrase)
    return bundle


def revoke_site(out: Path, name: str, *, reason: str, passphrase: Passphrase) -> SiteRecord:
    """Mark a hospital revoked (the registry re-signed with the CA key) and delete the copy of its
    private key kept in ``out``.

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
    registry.save(out, passphrase)
    (out / "sites" / name / "supernode.key").unlink(missing_ok=True)
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
