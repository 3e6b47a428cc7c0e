"""Provisioning: certificate properties, key files (each with its own passphrase), site bundles,
add/revoke, bad consortium files."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import re
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedmeta.common.errors import ConfigError, ProvisionError
from fedmeta.deploy.certs import make_ca, make_server_cert, verify_chain
from fedmeta.deploy.consortium import load_consortium, parse_consortium
from fedmeta.deploy.node import load_node_config
from fedmeta.deploy.provision import Registry, add_site, provision, revoke_site
from fedmeta.deploy.secrets import CA_KEY, Passphrase, is_encrypted, load_private_key

CONSORTIUM = {
    "consortium": "heart",
    "ca": {"validity_days": 1000},
    "coordinator": {"host": "coord.example.org", "sans": ["coord.example.org", "10.1.2.3"],
                    "validity_days": 365},
    "sites": [{"name": "cleveland", "partition_id": 0},
              {"name": "hungary", "site_config": "/srv/data/hungary.yaml"}],
}


SECRET = "correct horse battery staple"  # the coordinator key's
CA_SECRET = "the CA key has one of its own"


@pytest.fixture(autouse=True)
def _passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMETA_KEY_PASSPHRASE", SECRET)
    monkeypatch.setenv("FEDMETA_CA_PASSPHRASE", CA_SECRET)


PASS = Passphrase(env="FEDMETA_KEY_PASSPHRASE")
CA_PASS = Passphrase(env="FEDMETA_CA_PASSPHRASE", role=CA_KEY)


def _site_pass(out: Path, site: str) -> Passphrase:
    """The passphrase provisioning drew for a site key it made (``site_keys``)."""
    return Passphrase(file=out / "passphrases" / f"{site}.pass")


def _write(tmp_path: Path, doc: object, name: str = "consortium.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return p


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("prov")
    src = _write(tmp, CONSORTIUM)
    out = tmp / "out"
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDMETA_KEY_PASSPHRASE", SECRET)
    mp.setenv("FEDMETA_CA_PASSPHRASE", CA_SECRET)
    try:
        provision(load_consortium(src), out, ca_passphrase=CA_PASS, passphrase=PASS, site_keys=True)
    finally:
        mp.undo()
    return src, out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _days(cert: x509.Certificate) -> float:
    return (cert.not_valid_after_utc - cert.not_valid_before_utc) / dt.timedelta(days=1)


def test_ca_properties(provisioned: tuple[Path, Path]) -> None:
    _, out = provisioned
    ca = _cert(out / "ca" / "ca.crt")
    assert _days(ca) == pytest.approx(1000)
    assert ca.not_valid_before_utc <= dt.datetime.now(dt.UTC) <= ca.not_valid_after_utc
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.issuer == ca.subject


def test_server_certificate_properties_and_chain(provisioned: tuple[Path, Path]) -> None:
    _, out = provisioned
    ca = _cert(out / "ca" / "ca.crt")
    srv = _cert(out / "coordinator" / "server.crt")
    assert _days(srv) == pytest.approx(365)
    bc = srv.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = srv.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"coord.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1")}
    for host in ("coord.example.org", "10.1.2.3", "127.0.0.1", "localhost"):
        verify_chain(srv, ca, hostname=host)
    with pytest.raises(ProvisionError, match="chain check failed for 'evil.example.org'"):
        verify_chain(srv, ca, hostname="evil.example.org")
    other_ca = make_ca(common_name="other", organization="x", validity_days=10).cert
    with pytest.raises(ProvisionError, match="chain check failed"):
        verify_chain(srv, other_ca, hostname="coord.example.org")


def test_server_validity_never_outlives_ca() -> None:
    ca = make_ca(common_name="ca", organization="o", validity_days=30)
    srv = make_server_cert(ca, common_name="s", organization="o", sans=["localhost"],
                           validity_days=400)
    assert srv.cert.not_valid_after_utc <= ca.cert.not_valid_after_utc


def test_private_keys_have_mode_0600(provisioned: tuple[Path, Path]) -> None:
    _, out = provisioned
    keys = [out / "ca" / "ca.key", out / "coordinator" / "server.key",
            out / "sites" / "cleveland" / "supernode.key", out / "sites" / "hungary" / "supernode.key",
            out / "passphrases" / "cleveland.pass", out / "passphrases" / "hungary.pass"]
    for k in keys:
        assert stat.S_IMODE(k.stat().st_mode) == 0o600, k
    assert stat.S_IMODE((out / "ca").stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "passphrases").stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "sites" / "cleveland").stat().st_mode) == 0o700


def test_site_keys_are_encrypted_nist_ec_and_match(provisioned: tuple[Path, Path]) -> None:
    _, out = provisioned
    bundle = out / "sites" / "cleveland"
    assert (bundle / "supernode.key").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY")
    with pytest.raises(TypeError):  # no passphrase: unreadable
        serialization.load_pem_private_key((bundle / "supernode.key").read_bytes(), None)
    with pytest.raises(ValueError):  # a wrong one: unreadable
        serialization.load_pem_private_key((bundle / "supernode.key").read_bytes(), b"wrong passphrase!")
    own = _site_pass(out, "cleveland").read()
    priv = serialization.load_pem_private_key((bundle / "supernode.key").read_bytes(), own)
    pub = serialization.load_ssh_public_key((bundle / "supernode.pub").read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and isinstance(pub, ec.EllipticCurvePublicKey)
    assert priv.curve.name == "secp384r1"
    assert priv.public_key().public_numbers() == pub.public_numbers()
    other = load_private_key(out / "sites" / "hungary" / "supernode.key", _site_pass(out, "hungary"))
    assert other.private_numbers().private_value != priv.private_numbers().private_value
    for key in (out / "ca" / "ca.key", out / "coordinator" / "server.key"):
        assert is_encrypted(key), key


def test_plaintext_keys_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDMETA_KEY_PASSPHRASE")
    with pytest.raises(ProvisionError, match="the private key is encrypted with a passphrase of its own"):
        Passphrase.from_options(file=None, env=None, plaintext=False)
    short = tmp_path / "short.pass"
    short.write_text("too short\n")
    short.chmod(0o600)
    with pytest.raises(ProvisionError, match="at least 12 characters"):
        Passphrase(file=short).read()
    loose = tmp_path / "loose.pass"
    loose.write_text(SECRET + "\n")
    loose.chmod(0o644)
    with pytest.raises(ProvisionError, match="readable by others"):
        Passphrase(file=loose).read()
    out = tmp_path / "plain"
    plain = Passphrase.from_options(file=None, env=None, plaintext=True)
    provision(load_consortium(_write(tmp_path, CONSORTIUM)), out, ca_passphrase=plain, passphrase=plain,
              site_keys=True)
    assert not is_encrypted(out / "sites" / "cleveland" / "supernode.key")
    assert not (out / "passphrases").exists()
    node = load_node_config(out / "sites" / "cleveland" / "node.yaml")
    assert node.plaintext_key


def test_bundle_site_yaml_and_registry(provisioned: tuple[Path, Path]) -> None:
    _, out = provisioned
    site = load_node_config(out / "sites" / "cleveland" / "node.yaml")
    assert site.site == "cleveland"
    assert site.superlink == "coord.example.org:9092"
    assert site.root_certificates == (out / "sites" / "cleveland" / "ca.crt").resolve()
    assert site.node_config() == {"source": "fed-heart", "partition-id": 0, "synth-sites": 10,
                                  "synth-seed": 0}
    hungary = load_node_config(out / "sites" / "hungary" / "node.yaml")
    assert hungary.node_config() == {"site-config": "/srv/data/hungary.yaml"}
    assert site.app is not None and site.policy.min_patients == 20
    assert (out / "sites" / "cleveland" / "ca.crt").read_bytes() == (out / "ca" / "ca.crt").read_bytes()
    assert not (out / "sites" / "cleveland" / "ca.key").exists()
    reg = Registry.load(out)
    assert sorted(reg.sites) == ["cleveland", "hungary"]
    assert all(s.status == "active" for s in reg.sites.values())
    assert reg.sites["cleveland"].fingerprint.startswith("SHA256:")
    ports = json.loads((out / "coordinator" / "coordinator.json").read_text())
    assert ports["fleet_port"] == 9092 and ports["control_port"] == 9093


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_add_site_and_revoke_leave_others_untouched(tmp_path: Path) -> None:
    src = _write(tmp_path, CONSORTIUM)
    out = tmp_path / "out"
    provision(load_consortium(src), out, ca_passphrase=CA_PASS, passphrase=PASS, site_keys=True)
    before = {p: _digest(p) for p in out.rglob("*") if p.is_file() and p.name != "registry.json"}
    grown = dict(CONSORTIUM, sites=[*CONSORTIUM["sites"], {"name": "zurich"}])  # type: ignore[list-item]
    src2 = _write(tmp_path, grown, "consortium2.yaml")
    bundle = add_site(load_consortium(src2), out, "zurich", ca_passphrase=CA_PASS, site_keys=True)
    assert (bundle / "supernode.key").exists()
    assert stat.S_IMODE((bundle / "supernode.key").stat().st_mode) == 0o600
    load_private_key(bundle / "supernode.key", _site_pass(out, "zurich"))
    for p, d in before.items():
        assert _digest(p) == d, f"{p} changed by add_site"
    with pytest.raises(ProvisionError, match="site 'zurich' already provisioned"):
        add_site(load_consortium(src2), out, "zurich", ca_passphrase=CA_PASS, site_keys=True)
    with pytest.raises(ConfigError, match="no site named 'nowhere'"):
        add_site(load_consortium(src2), out, "nowhere", ca_passphrase=CA_PASS, site_keys=True)

    rec = revoke_site(out, "hungary", reason="left the consortium", ca_passphrase=CA_PASS)
    assert rec.status == "revoked" and rec.reason == "left the consortium"
    reg = Registry.load(out)
    assert [s.name for s in reg.active()] == ["cleveland", "zurich"]
    assert not (out / "coordinator" / "authorized" / "hungary.pub").exists()
    assert not (out / "passphrases" / "hungary.pass").exists()
    assert _digest(out / "sites" / "cleveland" / "supernode.key") == before[
        out / "sites" / "cleveland" / "supernode.key"]
    with pytest.raises(ProvisionError, match="already revoked"):
        revoke_site(out, "hungary", reason="again", ca_passphrase=CA_PASS)
    with pytest.raises(ProvisionError, match="already provisioned"):
        provision(load_consortium(src), out, ca_passphrase=CA_PASS, passphrase=PASS)


def _bad(**changes: object) -> dict[str, object]:
    doc = json.loads(json.dumps(CONSORTIUM))
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = doc
        for part in path:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return doc


_DELETE = object()

BAD_INPUTS = [
    (_bad(colour="blue"), r"unknown key 'colour' \(value 'blue'\)"),
    (_bad(coordinator__host=_DELETE), r"missing required key 'coordinator.host'"),
    (_bad(coordinator__fleet_port=70000), r"coordinator.fleet_port must be in \[1, 65535\], got 70000"),
    (_bad(coordinator__control_port=9092), r"control_port must differ from coordinator.fleet_port"),
    (_bad(sites=[{"name": "a"}, {"name": "a"}]), r"sites\[1\].name 'a' is listed twice"),
    (_bad(sites=[{"name": "Hospital A!"}]), r"sites\[0\].name must match .* got 'Hospital A!'"),
    (_bad(ca__validity_days=-5), r"ca.validity_days must be in \[1, 36500\], got -5"),
    (_bad(ca__validity_days="ten"), r"ca.validity_days must be an integer .* got 'ten'"),
    (_bad(sites=[]), r"sites must be a non-empty list of hospitals, got \[\]"),
    (_bad(sites=[{"name": "a", "data": "/x"}]), r"unknown key 'sites\[0\].data'"),
    (_bad(coordinator__sans=["bad name"]), r"coordinator.sans\[0\] must be a DNS name or an IP address, got 'bad name'"),
    (_bad(coordinator__validity_days=2000), r"coordinator.validity_days \(2000\) must not exceed ca.validity_days \(1000\)"),
    (_bad(coordinator__fleet_port=True), r"coordinator.fleet_port must be an integer"),
    (["not", "a", "mapping"], r"top level: expected a mapping, got list"),
]


@pytest.mark.parametrize(("doc", "message"), BAD_INPUTS)
def test_bad_consortium_is_rejected_naming_file_key_value(
    tmp_path: Path, doc: object, message: str
) -> None:
    path = _write(tmp_path, doc)
    with pytest.raises(ConfigError, match=message) as err:
        load_consortium(path)
    assert str(path) in str(err.value)


def test_unparseable_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_consortium(_write(tmp_path, "consortium: [unclosed"))
    with pytest.raises(ConfigError, match="cannot read consortium file"):
        load_consortium(tmp_path / "absent.yaml")


def test_defaults() -> None:
    c = parse_consortium({"consortium": "x", "coordinator": {"host": "10.0.0.1"},
                          "sites": [{"name": "a"}]})
    assert c.ca.validity_days == 3650 and c.coordinator.validity_days == 825
    assert c.coordinator.sans == ("10.0.0.1", "localhost", "127.0.0.1")
    assert c.coordinator.fleet_address == "10.0.0.1:9092"


def test_site_yaml_errors(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "k").write_text("x")
    from fedmeta.deploy.node import recommended_policy

    full = recommended_policy()
    base = {"site": "a", "superlink": "h:9092", "root_certificates": "ca.crt",
            "auth_private_key": "k", "policy": full}
    without_floor = {k: v for k, v in full.items() if k != "min_patients"}
    cases = [
        (dict(base, extra=1), "unknown key 'extra'"),
        ({k: v for k, v in base.items() if k != "policy"}, "missing required key 'policy'"),
        (dict(base, policy=without_floor), "policy: .*missing min_patients: node.yaml states every policy "
                                           "value .* a missing one is an error, never a default"),
        (dict(base, policy={"min_patients": 20}), "missing algorithms, require_dp, "),
        (dict(base, superlink="nohost"), "superlink must be HOST:PORT, got 'nohost'"),
        (dict(base, auth_private_key="missing.key"), "auth_private_key points to .*missing.key"),
        (dict(base, runtime_port=0), r"runtime_port must be an integer in \[1, 65535\], got 0"),
        (dict(base, node_config={"partition-id": 1}), "unknown key 'node_config'"),
        (dict(base, policy={**full, "min_patients": 0}), r"policy.min_patients = 0: must be >= 1"),
        (dict(base, policy={**full, "algorithms": ["sgd"]}), r"policy.algorithms = \['sgd'\]: unknown algorithm 'sgd'"),
        (dict(base, key_passphrase_env="X", plaintext_key=True), "give one of key_passphrase_file"),
        (dict(base, data={"source": "fed-heart"}), "exactly one of site: NAME or partition: N"),
    ]
    for doc, msg in cases:
        p = tmp_path / "node.yaml"
        p.write_text(yaml.safe_dump(doc))
        with pytest.raises(ConfigError, match=msg):
            load_node_config(p)


class _FakeControl:
    """The Control API calls reconcile makes, recorded."""

    def __init__(self) -> None:
        self.registered: dict[str, bytes] = {}

    def nodes(self) -> list[object]:
        return []

    def register(self, key: bytes, name: str) -> int:
        self.registered[name] = key
        return 100 + len(self.registered)

    def unregister(self, node_id: int) -> None:
        raise AssertionError("nothing to unregister")


def test_reconcile_registers_only_keys_that_match_the_registry(provisioned, tmp_path):
    """A missing or replaced authorized key is refused with a clear audit record, not a crash
    (an operator copied registry.json without the key, or someone swapped a key file)."""
    import shutil

    from fedmeta.deploy.coordinator import reconcile
    from fedmeta.deploy.launch import CoordinatorLayout
    from fedmeta.server.audit import read_log

    _, out = provisioned
    deployment = tmp_path / "deployment"
    shutil.copytree(out, deployment)
    authorized = deployment / "coordinator" / "authorized"
    control = _FakeControl()
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    layout = CoordinatorLayout(deployment, state)
    (authorized / "hungary.pub").unlink()
    ids = reconcile(layout, control)  # type: ignore[arg-type]
    assert set(ids) == {"cleveland"} and set(control.registered) == {"cleveland"}
    refused = [e for e in read_log(layout.audit) if e["event"] == "node_refused"]
    assert len(refused) == 1 and "hungary.pub cannot be read" in str(refused[0]["reason"])
    # a key file replaced by another key is refused too
    from fedmeta.deploy.sitekeys import make_site_keys

    other = make_site_keys(tmp_path / "other", comment="other", passphrase=None)
    shutil.copy(other.public, authorized / "hungary.pub")
    control2 = _FakeControl()
    assert set(reconcile(layout, control2)) == {"cleveland"}  # type: ignore[arg-type]
    refused = [e for e in read_log(layout.audit) if e["event"] == "node_refused"]
    assert "not the registry's" in str(refused[-1]["reason"])


def test_the_superlink_keeps_its_state_in_memory_unless_asked_to_persist_it(provisioned, tmp_path):
    """Flower's default (in memory) unless --persist-state; then the owner-only state folder."""
    from fedmeta.deploy.launch import CoordinatorLayout, superlink_argv

    _, out = provisioned
    layout = CoordinatorLayout(out, tmp_path / "state")
    args = dict(key_path="/proc/self/fd/9", fleet_address="127.0.0.1:1", secret_path="/proc/self/fd/8")
    default = superlink_argv(layout, **args)  # type: ignore[arg-type]
    assert "--database" not in default and "--enable-supernode-auth" in default
    # the Control API on the state folder's socket, no TCP port for it; the SuperLink starts nothing
    assert default[default.index("--control-socket") + 1] == str(tmp_path / "state" / "superlink.sock")
    assert "--host" not in default and "--port" not in default
    assert default[default.index("--isolation") + 1] == "process"
    persisted = superlink_argv(layout, persist_state=True, **args)  # type: ignore[arg-type]
    at = persisted.index("--database")
    assert Path(persisted[at + 1]) == tmp_path / "state" / "superlink.db"
    assert [a for a in persisted if a not in ("--database", persisted[at + 1])] == default


def test_a_passphrase_file_readable_by_others_is_refused_unless_it_is_a_systemd_credential(tmp_path, monkeypatch):
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o500 | 0o200)
    for folder in (tmp_path, creds):
        f = folder / "key-passphrase"
        f.write_text(SECRET + "\n")
        f.chmod(0o640)  # what a systemd credential with a user ACL looks like
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with pytest.raises(ProvisionError, match="readable by others"):
        Passphrase(file=tmp_path / "key-passphrase").read()
    assert Passphrase(file=creds / "key-passphrase").read() == SECRET.encode()
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ProvisionError, match="readable by others"):
        Passphrase(file=creds / "key-passphrase").read()


def test_the_documented_node_yaml_states_every_policy_value_and_is_valid(tmp_path: Path) -> None:
    """deploy/README.md's node.yaml example is a complete policy (it would be refused otherwise)."""
    import re

    from fedmeta.sitecore.policy import SitePolicy

    text = (Path(__file__).resolve().parents[2] / "deploy" / "README.md").read_text()
    block = re.search(r"```yaml\nsite: cleveland\n(.*?)```", text, re.S)
    assert block is not None
    doc = yaml.safe_load("site: cleveland\n" + block.group(1))
    assert set(doc["policy"]) == set(SitePolicy.model_fields)
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "supernode.key").write_text("x")
    doc.update(root_certificates="ca.crt", auth_private_key="supernode.key", data=None, state="state")
    doc.pop("key_passphrase_file")
    doc["key_passphrase_env"] = "FEDMETA_KEY_PASSPHRASE"
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(doc))
    node = load_node_config(tmp_path / "node.yaml")
    assert node.policy == SitePolicy.model_validate({**doc["policy"]})


# -- the registry is signed by the consortium CA ------------------------------------------------------


def _copy(out: Path, tmp_path: Path, name: str) -> Path:
    import shutil

    dest = tmp_path / name
    shutil.copytree(out, dest)
    return dest


def test_a_changed_or_unsigned_registry_is_refused_by_both_readers(provisioned, tmp_path, monkeypatch):
    """An entry added to registry.json by anyone without the CA key (the attack: a run wrote its
    own key in), a signature removed, or a registry signed by another CA: each is an error that
    names the file, from the provisioning reader and from the ServerApp's, never a fallback."""
    from fedmeta.deploy.certs import cert_pem, make_ca, write_public_bytes
    from fedmeta.server.identity import Registry as NodeRegistry

    _, out = provisioned
    original = NodeRegistry.load(out / "registry.json")  # the signed registry reads
    assert sorted(original.active.values()) == ["cleveland", "hungary"]
    tampered = _copy(out, tmp_path, "tampered")
    doc = json.loads((tampered / "registry.json").read_text())
    doc["sites"]["intruder"] = {**doc["sites"]["cleveland"], "name": "intruder", "fingerprint": "SHA256:x"}
    (tampered / "registry.json").write_text(json.dumps(doc))
    unsigned = _copy(out, tmp_path, "unsigned")
    doc = json.loads((unsigned / "registry.json").read_text())
    del doc["signature"]
    (unsigned / "registry.json").write_text(json.dumps(doc))
    other_ca = _copy(out, tmp_path, "other-ca")
    other = make_ca(common_name="not ours", organization="x", validity_days=1)
    write_public_bytes(other_ca / "coordinator" / "ca.crt", cert_pem(other.cert))
    cases = [(tampered, "signature does not verify"), (unsigned, "is not signed by the consortium CA"),
             (other_ca, "signature does not verify")]
    for folder, why in cases:
        path = folder / "registry.json"
        with pytest.raises(ProvisionError, match=rf"^{re.escape(str(path))}: .*{why}"):
            Registry.load(folder)
        with pytest.raises(ProvisionError, match=rf"^{re.escape(str(path))}: .*{why}"):
            NodeRegistry.load(path)
    # the coordinator pins the CA certificate it started with: a swapped one is refused too
    monkeypatch.setenv("FEDMETA_CA_SHA256", "0" * 64)
    with pytest.raises(ProvisionError, match="is not the CA certificate the coordinator started with"):
        NodeRegistry.load(out / "registry.json")


def test_changing_the_registry_needs_the_ca_key_and_the_coordinator_revokes_without_it(provisioned, tmp_path):
    from fedmeta.deploy.provision import record_revocation

    _, out = provisioned
    coordinator = tmp_path / "coordinator-pki"  # what the coordinator host holds: no ca/
    coordinator.mkdir()
    import shutil

    shutil.copytree(out / "coordinator", coordinator / "coordinator")
    shutil.copyfile(out / "registry.json", coordinator / "registry.json")
    with pytest.raises(ProvisionError, match=r"ca/ca\.key: the consortium CA key signs registry\.json"):
        revoke_site(coordinator, "hungary", reason="x", ca_passphrase=CA_PASS)
    rec = record_revocation(coordinator, "hungary", reason="left")
    assert rec.status == "revoked"
    assert [s.name for s in Registry.load(coordinator).active()] == ["cleveland"]
    assert (coordinator / "registry.json").read_bytes() == (out / "registry.json").read_bytes()
    assert not (coordinator / "coordinator" / "authorized" / "hungary.pub").exists()
    with pytest.raises(ProvisionError, match="already revoked"):
        record_revocation(coordinator, "hungary", reason="again")


def test_no_passphrase_reaches_a_flower_process_s_environment(tmp_path: Path, monkeypatch) -> None:
    """fedmeta decrypts every key into memory before it starts the SuperLink, the executor or a
    SuperNode; their environment (and so any app's) holds no passphrase, the default variable or
    the one the operator named. Control arm: the environment fedmeta's own processes get keeps it."""
    from fedmeta.deploy.launch import app_env, base_env

    monkeypatch.setenv("FEDMETA_KEY_PASSPHRASE", "a passphrase of some length")
    monkeypatch.setenv("FEDMETA_CA_PASSPHRASE", "the CA key's own passphrase")
    monkeypatch.setenv("SITE_KEY_PASS", "another passphrase here")
    names = {"FEDMETA_KEY_PASSPHRASE", "FEDMETA_CA_PASSPHRASE", "SITE_KEY_PASS"}
    assert names <= set(base_env(tmp_path))
    env = app_env(tmp_path, passphrase_env="SITE_KEY_PASS")
    assert not names & set(env)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_HOME"] == str(tmp_path)


# -- each key its own passphrase --------------------------------------------------------------------


def _old_single_passphrase_layout(out: Path, secret: bytes) -> None:
    """What provisioning wrote before keys had passphrases of their own (the control arms): the CA
    key, the coordinator key and a site key made by the coordinator, all under one passphrase."""
    from fedmeta.deploy.certs import write_issued
    from fedmeta.deploy.sitekeys import make_site_keys

    ca = make_ca(common_name="ca", organization="o", validity_days=10)
    write_issued(ca, out / "ca" / "ca.crt", out / "ca" / "ca.key", passphrase=secret)
    server = make_server_cert(ca, common_name="s", organization="o", sans=["localhost"], validity_days=10)
    write_issued(server, out / "coordinator" / "server.crt", out / "coordinator" / "server.key", passphrase=secret)
    make_site_keys(out / "sites" / "cleveland", comment="c", passphrase=secret)


def _opens(key: Path, secret: bytes) -> bool:
    try:
        serialization.load_pem_private_key(key.read_bytes(), secret)
    except ValueError:
        return False
    return True


def test_the_ca_key_and_the_coordinator_key_each_have_their_own_passphrase(provisioned, tmp_path):
    """The CA key opens with its own passphrase only, not with the coordinator's (the one a
    coordinator host holds), and the other way round. Control arm: under the old single
    passphrase the coordinator's passphrase opened the CA key."""
    _, out = provisioned
    ca_key, server_key = out / "ca" / "ca.key", out / "coordinator" / "server.key"
    for key in (ca_key, server_key):
        assert key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY"), key
        with pytest.raises(TypeError):  # no passphrase: unreadable
            serialization.load_pem_private_key(key.read_bytes(), None)
    assert _opens(ca_key, CA_SECRET.encode()) and not _opens(ca_key, SECRET.encode())
    assert _opens(server_key, SECRET.encode()) and not _opens(server_key, CA_SECRET.encode())
    old = tmp_path / "old"
    _old_single_passphrase_layout(old, SECRET.encode())
    assert _opens(old / "ca" / "ca.key", SECRET.encode())  # control: the same check fails there


def test_provisioning_refuses_one_passphrase_for_the_ca_and_the_coordinator(tmp_path, monkeypatch):
    """Equal passphrases are refused before anything is written, and a missing CA passphrase is
    an error naming the CA key, never the coordinator key's passphrase taken instead. Control
    arm: the variable the coordinator key's passphrase comes from is set, and read for that key."""
    src = _write(tmp_path, CONSORTIUM)
    out = tmp_path / "out"
    same = Passphrase(env="FEDMETA_KEY_PASSPHRASE", role=CA_KEY)
    with pytest.raises(ProvisionError, match="the consortium CA key's passphrase .* is the coordinator key's"):
        provision(load_consortium(src), out, ca_passphrase=same, passphrase=PASS, site_keys=True)
    assert not out.exists()
    monkeypatch.delenv("FEDMETA_CA_PASSPHRASE")
    with pytest.raises(ProvisionError, match=r"^the consortium CA key is encrypted with a passphrase of its "
                                             r"own: give --ca-passphrase-file FILE, or set \$FEDMETA_CA_PASSPHRASE"):
        Passphrase.from_options(file=None, env=None, plaintext=False, role=CA_KEY)
    assert Passphrase.from_options(file=None, env=None, plaintext=False).read() == SECRET.encode()


def test_by_default_no_site_private_key_is_made_here(tmp_path):
    """Provisioning registers the public key a hospital made itself (``fedmeta site keygen``) and
    makes no private key for any site; a site that sent none waits, and adding it needs its public
    key. Control arm: only when asked (``site_keys``) are private keys made here."""
    from fedmeta.deploy.provision import pending_sites
    from fedmeta.deploy.sitekeys import make_site_keys

    own = make_site_keys(tmp_path / "at-cleveland", comment="cleveland", passphrase=b"cleveland's own secret")
    doc = json.loads(json.dumps(CONSORTIUM))
    doc["sites"][0]["public_key"] = "at-cleveland/supernode.pub"  # relative to the consortium file
    src = _write(tmp_path, doc)
    out = tmp_path / "out"
    registry = provision(load_consortium(src), out, ca_passphrase=CA_PASS, passphrase=PASS)
    assert sorted(p.name for p in out.rglob("*.key")) == ["ca.key", "server.key"]
    assert not (out / "passphrases").exists()
    assert registry.sites["cleveland"].fingerprint == own.fingerprint
    assert (out / "sites" / "cleveland" / "supernode.pub").read_bytes() == own.public.read_bytes()
    assert pending_sites(load_consortium(src), registry) == ["hungary"]
    assert not (out / "sites" / "hungary").exists()
    with pytest.raises(ProvisionError, match="site 'hungary': give --public-key FILE"):
        add_site(load_consortium(src), out, "hungary", ca_passphrase=CA_PASS)
    theirs = make_site_keys(tmp_path / "at-hungary", comment="hungary", passphrase=b"hungary's own secret")
    add_site(load_consortium(src), out, "hungary", ca_passphrase=CA_PASS, public_key=theirs.public)
    assert Registry.load(out).sites["hungary"].fingerprint == theirs.fingerprint
    assert not list((out / "sites").rglob("supernode.key"))
    node = yaml.safe_load((out / "sites" / "hungary" / "node.yaml").read_text())  # names the site's own key
    assert node["auth_private_key"] == "supernode.key" and "plaintext_key" not in node
    made = tmp_path / "made"
    provision(load_consortium(_write(tmp_path, CONSORTIUM, "c2.yaml")), made, ca_passphrase=CA_PASS,
              passphrase=PASS, site_keys=True)
    assert len(list((made / "sites").rglob("supernode.key"))) == 2  # control: the check can fail


def test_site_keys_made_here_each_have_a_fresh_passphrase_of_their_own(provisioned, tmp_path, monkeypatch):
    """Asked to make the site keys, provisioning encrypts each with its own random passphrase,
    in an owner-only file per site, never the CA's or the coordinator's or another site's: a
    site's file opens its key only. Control arm: under the old single passphrase one site's key
    opened with the CA's passphrase."""
    from fedmeta.deploy import secrets as key_secrets

    _, out = provisioned
    values = {s: (out / "passphrases" / f"{s}.pass").read_text().strip() for s in ("cleveland", "hungary")}
    assert len(set(values.values())) == 2 and not set(values.values()) & {SECRET, CA_SECRET}
    assert all(len(v) >= 40 for v in values.values())  # 32 random bytes, URL-safe
    keys = {s: out / "sites" / s / "supernode.key" for s in values}
    for site, key in keys.items():
        assert is_encrypted(key)
        other = "hungary" if site == "cleveland" else "cleveland"
        assert _opens(key, values[site].encode())
        for wrong in (values[other], CA_SECRET, SECRET):
            assert not _opens(key, wrong.encode()), (site, wrong)
    old = tmp_path / "old"
    _old_single_passphrase_layout(old, CA_SECRET.encode())
    assert _opens(old / "sites" / "cleveland" / "supernode.key", CA_SECRET.encode())  # control
    # a draw equal to a passphrase in use is drawn again (the generator is made to repeat the CA's)
    draws = iter([CA_SECRET, "a second draw, never used before"])
    monkeypatch.setattr(key_secrets.secrets, "token_urlsafe", lambda n: next(draws))
    assert key_secrets.fresh_passphrase([CA_SECRET.encode()]) == b"a second draw, never used before"


def test_each_key_is_loaded_with_its_own_passphrase_and_a_wrong_one_names_the_key(provisioned, tmp_path):
    """Changing the registry (the CA key), starting the coordinator (its TLS key): a wrong or
    missing passphrase is one error naming the key, before anything is written or started.
    Control arm: the same calls with the key's own passphrase go through."""
    from fedmeta.deploy.coordinator import start_coordinator
    from fedmeta.deploy.processes import Processes

    _, out = provisioned
    pki = _copy(out, tmp_path, "pki")
    signed = (pki / "registry.json").read_bytes()
    coordinator_pass_as_ca = Passphrase(env="FEDMETA_KEY_PASSPHRASE", role=CA_KEY)
    with pytest.raises(ProvisionError, match=r"ca\.key: cannot load the consortium CA key: wrong passphrase "
                                             r"\(passphrase from \$FEDMETA_KEY_PASSPHRASE\)"):
        revoke_site(pki, "hungary", reason="x", ca_passphrase=coordinator_pass_as_ca)
    grown = dict(CONSORTIUM, sites=[*CONSORTIUM["sites"], {"name": "zurich"}])  # type: ignore[list-item]
    src2 = _write(tmp_path, grown, "consortium2.yaml")
    with pytest.raises(ProvisionError, match="cannot load the consortium CA key: wrong passphrase"):
        add_site(load_consortium(src2), pki, "zurich", ca_passphrase=coordinator_pass_as_ca, site_keys=True)
    assert not (pki / "sites" / "zurich").exists() and not (pki / "passphrases" / "zurich.pass").exists()
    assert (pki / "registry.json").read_bytes() == signed
    with Processes(tmp_path / "run") as procs:
        for wrong, why in ((CA_PASS, "wrong passphrase"), (Passphrase(none=True), "is encrypted; give its passphrase")):
            with pytest.raises(ProvisionError, match=rf"server\.key: .*the coordinator's TLS key.*{why}"):
                start_coordinator(procs, deployment=pki, state=tmp_path / "state", passphrase=wrong,
                                  fleet_address="127.0.0.1:1")
            assert procs.procs == {}  # nothing started
    revoke_site(pki, "hungary", reason="x", ca_passphrase=CA_PASS)  # control: its own passphrase
    assert load_private_key(pki / "coordinator" / "server.key", PASS)


def test_deploy_local_gives_every_key_a_random_passphrase_of_its_own(tmp_path):
    """The throwaway consortium of ``fedmeta deploy local``: CA, coordinator and site keys each
    encrypted with a different random passphrase, in owner-only files, none in the environment."""
    import os

    from fedmeta.deploy.local import provision_local, write_local_consortium

    before = dict(os.environ)
    path = write_local_consortium(tmp_path / "c.yaml", sites=["a", "b"], fleet_port=1, control_port=2)
    keys = provision_local(path, tmp_path / "pki", secrets_dir=tmp_path / "secrets")
    assert dict(os.environ) == before
    files = {"ca": keys.ca.file, "coordinator": keys.coordinator.file, "a": keys.site("a"), "b": keys.site("b")}
    values = {k: f.read_text().strip() for k, f in files.items() if f is not None}
    assert len(values) == 4 and len(set(values.values())) == 4
    for f in files.values():
        assert f is not None and stat.S_IMODE(f.stat().st_mode) == 0o600, f
    pki = tmp_path / "pki"
    for key, owner in ((pki / "ca" / "ca.key", "ca"), (pki / "coordinator" / "server.key", "coordinator"),
                       (pki / "sites" / "a" / "supernode.key", "a"), (pki / "sites" / "b" / "supernode.key", "b")):
        assert [k for k, v in values.items() if _opens(key, v.encode())] == [owner], key
