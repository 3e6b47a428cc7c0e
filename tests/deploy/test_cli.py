"""``fedmeta provision`` and friends through the command line (no processes started)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from fedmeta.cli.main import main


def _consortium(tmp_path: Path, **extra: object) -> Path:
    doc = {"consortium": "c", "coordinator": {"host": "127.0.0.1"},
           "sites": [{"name": "a"}, {"name": "b"}], **extra}
    p = tmp_path / "consortium.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_provision_add_and_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedmeta.deploy.provision import Registry

    c = _consortium(tmp_path)
    out = tmp_path / "pki"
    ca_pw = _secret(tmp_path, "ca.pass", "the CA's own passphrase")
    assert main(["provision", "--consortium", str(c), "--out", str(out), *ca_pw]) == 2
    assert "the coordinator's TLS key is encrypted with a passphrase of its own: give --passphrase-file" \
        in capsys.readouterr().err
    assert not out.exists()  # nothing written before the passphrase is known
    pw = _secret(tmp_path, "key.pass", "a passphrase of some length")
    assert main(["provision", "--consortium", str(c), "--out", str(out), *pw]) == 2
    assert "the consortium CA key is encrypted with a passphrase of its own: give --ca-passphrase-file" \
        in capsys.readouterr().err
    assert not out.exists()
    assert main(["provision", "--consortium", str(c), "--out", str(out), *pw, *ca_pw, "--site-keys"]) == 0
    assert "2 site bundles" in capsys.readouterr().out
    assert stat.S_IMODE((out / "sites" / "a" / "supernode.key").stat().st_mode) == 0o600
    assert main(["provision", "--consortium", str(c), "--out", str(out), *pw, *ca_pw]) == 2
    assert "already provisioned" in capsys.readouterr().err
    doc = yaml.safe_load(c.read_text())
    doc["sites"].append({"name": "late"})
    c.write_text(yaml.safe_dump(doc))
    add = ["provision", "--consortium", str(c), "--out", str(out), "--add-site", "late", "--site-keys"]
    assert main([*add, *ca_pw]) == 0
    assert (out / "sites" / "late" / "node.yaml").is_file()
    printed = capsys.readouterr().out
    assert "late.pass: hand it over apart from the bundle" in printed
    assert f"issued bundle for late (key {Registry.load(out).sites['late'].fingerprint})" in printed
    # the registry is re-signed with the CA key: revoking needs its passphrase, not the coordinator's
    assert main(["provision", "--out", str(out), "--revoke", "a", "--reason", "test"]) == 2
    assert "the consortium CA key is encrypted with a passphrase of its own" in capsys.readouterr().err
    assert main(["provision", "--out", str(out), "--revoke", "a", "--reason", "test", *pw]) == 2
    assert "use the CA key only" in capsys.readouterr().err
    assert main(["provision", "--out", str(out), "--revoke", "a", "--reason", "test", *ca_pw]) == 0
    assert "revoked a" in capsys.readouterr().out


def _secret(folder: Path, name: str, value: str) -> list[str]:
    path = folder / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return ["--ca-passphrase-file" if name.startswith("ca") else "--passphrase-file", str(path)]


def test_bad_consortium_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = _consortium(tmp_path, extra_key=1)
    assert main(["provision", "--consortium", str(c), "--out", str(tmp_path / "pki"), "--plaintext-keys"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'extra_key'" in err and str(c) in err
    assert not (tmp_path / "pki").exists()


def test_run_without_a_running_coordinator_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", "--deployment", str(tmp_path), "--state", str(tmp_path / "state")])
    assert code == 2
    assert "is `fedmeta coordinator start" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "rounds=abc"], "rounds = 'abc': expected int"),
    (["--rounds", "1", "--set", "rounds=3"], "--rounds 1 and --set rounds=…: give one of them"),
    (["--config", "EMPTY"], "the experiment file holds no settings"),
    (["--set", "data.holdout=['Nowhere General']"], "Nowhere General"),
    (["--set", "federation.min_nodes=5"], "more than the 2 sites started"),
])
def test_deploy_local_checks_the_experiment_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n")
    out = tmp_path / "out"
    argv = ["deploy", "local", "--sites", "2", "--out", str(out), *[str(empty) if a == "EMPTY" else a for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()  # nothing provisioned, started or written


def test_run_checks_the_experiment_before_submitting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--deployment", str(tmp_path), "--state", str(tmp_path / "state"),
                 "--set", "data.holdout=[\"VA Long Beach\"]", "inner.steps=-1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "inner.steps" in err and "Traceback" not in err


def test_deploy_local_picks_sites_that_meet_the_default_policy(caplog) -> None:
    """Switzerland tests on 16 patients (< the default min_patients 20): three sites are the
    three that take part; asked for all four, the one that will decline is named up front."""
    import logging

    from fedmeta.common.config import load_config
    from fedmeta.deploy.local import site_names

    cfg = load_config(None, [])
    assert site_names(cfg, 3) == ["Cleveland", "Hungary", "VA Long Beach"]
    with caplog.at_level(logging.WARNING):
        assert site_names(cfg, 4) == ["Cleveland", "Hungary", "VA Long Beach", "Switzerland"]
    assert ("site Switzerland will decline under the default policy: 30 training and 16 test "
            "patients, below min_patients = 20") in caplog.text


def test_secure_aggregation_with_the_default_auto_is_refused_before_anything_starts(tmp_path) -> None:
    from fedmeta.common.errors import ConfigError
    from fedmeta.deploy.local import deploy_local

    with pytest.raises(ConfigError, match="--secagg: algorithm auto chooses among candidates .* "
                                          "--set algorithm=reptile"):
        deploy_local(sites=3, rounds=1, out=tmp_path / "out", secagg=True)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--secagg: secure aggregation cannot carry algorithm 'fedavg': a "
                                          "FedAvg reply is weighted by the site's training rows"):
        deploy_local(sites=3, rounds=1, out=tmp_path / "out", secagg=True, overrides=["algorithm=fedavg"])
    assert not (tmp_path / "out").exists()


def test_coordinator_revoke_needs_no_ca_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On the coordinator host (no ca/ folder) a revocation goes beside the signed registry, which
    is left as the CA signed it; the site reads as revoked from then on."""
    import shutil

    from fedmeta.deploy.provision import Registry

    c = _consortium(tmp_path)
    out = tmp_path / "pki"
    pw = [*_secret(tmp_path, "key.pass", "a passphrase of some length"),
          *_secret(tmp_path, "ca.pass", "the CA's own passphrase")]
    assert main(["provision", "--consortium", str(c), "--out", str(out), *pw, "--site-keys"]) == 0
    shutil.rmtree(out / "ca")  # what the coordinator host holds
    signed = (out / "registry.json").read_bytes()
    assert main(["coordinator", "revoke", "--deployment", str(out), "--state", str(tmp_path / "state"),
                 "--site", "a", "--reason", "left"]) == 0
    assert "a was not registered with this coordinator; marked revoked" in capsys.readouterr().out
    assert (out / "registry.json").read_bytes() == signed
    assert Registry.load(out).sites["a"].status == "revoked"


def test_a_wrong_or_missing_passphrase_stops_a_start_in_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`coordinator start` and `site start` decrypt their key with its own passphrase before
    anything starts: a wrong or missing one is one line naming the key, exit 2, no traceback.
    Control arm: the site's own passphrase gets it past its key, to the next check (no data)."""
    import os

    for name in ("FEDMETA_KEY_PASSPHRASE", "FEDMETA_CA_PASSPHRASE"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "pki"
    co_pw = _secret(tmp_path, "key.pass", "a passphrase of some length")
    ca_pw = _secret(tmp_path, "ca.pass", "the CA's own passphrase")
    assert main(["provision", "--consortium", str(_consortium(tmp_path)), "--out", str(out), *co_pw, *ca_pw,
                 "--site-keys"]) == 0
    capsys.readouterr()
    start = ["coordinator", "start", "--deployment", str(out), "--state", str(tmp_path / "state")]
    cases = [
        (start, "the coordinator's TLS key is encrypted with a passphrase of its own: give --passphrase-file"),
        ([*start, "--passphrase-file", ca_pw[1]], "server.key: cannot load the coordinator's TLS key: wrong passphrase"),
        (["site", "start", "--node", str(out / "sites" / "a" / "node.yaml")],
         "site a's key is encrypted with a passphrase of its own: give key_passphrase_file: FILE"),
        (["site", "start", "--node", str(out / "sites" / "a" / "node.yaml"), "--passphrase-file", co_pw[1]],
         "supernode.key: cannot load site a's key: wrong passphrase"),
        (["site", "start", "--node", str(out / "sites" / "a" / "node.yaml"), "--passphrase-file",
          str(out / "passphrases" / "b.pass")], "cannot load site a's key: wrong passphrase"),
    ]
    umask = os.umask(0o022)
    try:
        for argv, message in cases:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.startswith("fedmeta: error: ") and message in err, err
            assert err.count("\n") == 1 and "Traceback" not in err
        assert not list((tmp_path / "state").rglob("*.log"))  # no SuperLink was started
        assert not list((out / "sites" / "a" / "state").rglob("*.log"))  # no SuperNode either
        # control: with its own passphrase the site gets past its key, to the next check
        assert main(["site", "start", "--node", str(out / "sites" / "a" / "node.yaml"), "--passphrase-file",
                     str(out / "passphrases" / "a.pass")]) == 2
        assert "names no data" in capsys.readouterr().err
    finally:
        os.umask(umask)
