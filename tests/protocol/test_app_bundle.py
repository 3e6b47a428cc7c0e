"""A site accepts only the fedmeta app bundle it installed: no code, fedmeta's components, its version."""

from __future__ import annotations

import io
import zipfile

import pytest

from fedmeta.protocol.app import FAB_ID, check_bundle, code_digest, render_pyproject

VERSION = "1.2.3"


def _bundle(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return buf.getvalue()


def _check(content: bytes, *, fab_id: str = FAB_ID, version: str = VERSION, allow: bool = True):  # type: ignore[no-untyped-def]
    return check_bundle(content, fab_id=fab_id, fab_version=version, version=VERSION,
                        allow_secure_aggregation=allow)


def test_fedmeta_bundles_are_accepted() -> None:
    plain = _check(_bundle({"pyproject.toml": render_pyproject(version=VERSION), ".info/CONTENT": "x"}))
    assert plain.accepted and not plain.secure_aggregation
    secagg = _check(_bundle({"pyproject.toml": render_pyproject(version=VERSION, secure_aggregation=True)}))
    assert secagg.accepted and secagg.secure_aggregation


@pytest.mark.parametrize(("content", "kwargs", "reason"), [
    (_bundle({"pyproject.toml": render_pyproject(version=VERSION), "evil.py": "import os"}), {},
     r"carries files \(evil.py\)"),
    (_bundle({"pyproject.toml": render_pyproject(version=VERSION)}), {"fab_id": "evil/fedmeta"},
     r"app 'evil/fedmeta' is not 'fedmeta/fedmeta'"),
    (_bundle({"pyproject.toml": render_pyproject(version=VERSION)}), {"version": "9.9"},
     r"app version '9.9' is not the installed '1.2.3'"),
    (_bundle({"pyproject.toml": render_pyproject(version="9.9")}), {},
     r"declares fedmeta/fedmeta 9.9"),
    (_bundle({"pyproject.toml": render_pyproject(version=VERSION).replace(
        "fedmeta.client.app:app", "os:system")}), {}, r"components not fedmeta's: clientapp='os:system'"),
    # a hostile ServerApp beside fedmeta's ClientApp: the decoy attack's bundle
    (_bundle({"pyproject.toml": render_pyproject(version=VERSION).replace(
        "fedmeta.server.app:app", "hostile_server:app")}), {},
     r"components not fedmeta's: serverapp='hostile_server:app'"),
    # fedmeta's own components, but not a pair (plain ServerApp, SecAgg+ ClientApp)
    (_bundle({"pyproject.toml": render_pyproject(version=VERSION).replace(
        "fedmeta.client.app:app", "fedmeta.client.secagg_app:app")}), {},
     r"the components are not one of fedmeta's pairs"),
    # an extra component rides along
    (_bundle({"pyproject.toml": render_pyproject(version=VERSION).replace(
        'clientapp = "fedmeta.client.app:app"', 'clientapp = "fedmeta.client.app:app"\nsuperexec = "x:y"')}),
     {}, r"components not fedmeta's: superexec='x:y'"),
    (_bundle({"pyproject.toml": render_pyproject(version=VERSION, secure_aggregation=True)}),
     {"allow": False}, r"secure aggregation runs are not allowed"),
    (b"not a zip", {}, r"not a readable app bundle"),
    (_bundle({"other.toml": "x"}), {}, r"carries files \(other.toml\)"),
])
def test_anything_else_is_refused_with_a_reason(content: bytes, kwargs: dict, reason: str) -> None:
    verdict = _check(content, **kwargs)
    assert not verdict.accepted
    assert __import__("re").search(reason, verdict.reason), verdict.reason


def test_code_digest_covers_the_installed_code(tmp_path, monkeypatch) -> None:
    import fedmeta.protocol.app as app

    first = code_digest()
    assert first == code_digest() and len(first) == 64
    # A changed file changes the digest: point one package at a copy and edit it.
    import shutil

    import fedmeta.sitecore as sitecore

    copy = tmp_path / "sitecore"
    shutil.copytree(next(iter(sitecore.__path__)), copy)
    (copy / "policy.py").write_text((copy / "policy.py").read_text() + "\n# changed\n")
    monkeypatch.setattr(sitecore, "__path__", [str(copy)])
    assert app.code_digest() != first
