"""The packages import along their layers only, and Flower's internals through one module.

The layers (README, Layout): ``common`` is what both sides share and imports no other layer;
``protocol`` (the wire) builds on ``common``; the hospital's side (``sitecore``, then ``client``)
and the coordinator's side (``server``) build on those two and never on each other; ``deploy``
(the operator's launcher, which starts both sides), ``cli`` and ``bench`` come last. Every
``import`` and ``from … import`` in the source is read, function-level ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: folder -> the fedmeta packages its modules may import (besides their own). ``fedmeta`` is the
#: package root (``api/``): the version and the public loader.
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "protocol": {"common", "fedmeta"},
    "sitecore": {"common", "protocol"},
    "client": {"common", "protocol", "sitecore"},
    "server": {"common", "protocol"},
    "deploy": {"common", "protocol", "sitecore", "client", "server"},
    "cli": {"common", "protocol", "sitecore", "client", "server", "deploy", "bench", "fedmeta"},
    "bench": {"common", "protocol", "sitecore", "client", "server", "deploy", "cli", "fedmeta"},
    "api": {"common"},
}
PACKAGE = {"api": "fedmeta"}

#: Flower's public API, which any module may use. Everything else under ``flwr`` is internal
#: and is reached only through :mod:`fedmeta.protocol.flower_compat`.
FLOWER_PUBLIC = frozenset({
    "flwr.app", "flwr.serverapp", "flwr.clientapp", "flwr.simulation", "flwr.common",
    "flwr.server", "flwr.server.strategy", "flwr.server.workflow", "flwr.client.mod",
})
FLOWER_COMPAT = ROOT / "protocol" / "flower_compat.py"


def _imports(path: Path) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fedmeta":
        return None
    if len(parts) == 1 or parts[1] not in ALLOWED:
        return "fedmeta"
    return PACKAGE.get(parts[1], parts[1])


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def crossings(folder: str) -> list[str]:
    """``file:line module`` of every import from ``folder`` into a layer it may not use."""
    own = PACKAGE.get(folder, folder)
    bad = []
    for path in _sources(folder):
        for line, module in _imports(path):
            layer = _layer_of(module)
            if layer is not None and layer != own and layer not in ALLOWED[folder]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


def flower_internals(paths: list[Path]) -> list[str]:
    bad = []
    for path in paths:
        if path == FLOWER_COMPAT:
            continue
        for line, module in _imports(path):
            if (module == "flwr" or module.startswith("flwr.")) and module not in FLOWER_PUBLIC:
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                bad.append(f"{where}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_follow_the_layers(folder: str) -> None:
    assert crossings(folder) == []


def test_the_layer_check_sees_a_crossing(tmp_path: Path) -> None:
    # the check itself: a function-level import against the layers is found
    probe = ROOT / "common" / "_layer_probe_test.py"
    probe.write_text("def f():\n    from fedmeta.server.app import app\n    return app\n", encoding="utf-8")
    try:
        assert crossings("common") == ["common/_layer_probe_test.py:2 imports fedmeta.server.app"]
    finally:
        probe.unlink()


def test_flower_internals_are_reached_through_one_module() -> None:
    paths = [p for folder in ALLOWED for p in _sources(folder)]
    assert flower_internals(paths) == []


def test_the_flower_check_sees_an_internal_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from flwr.supercore.heartbeat import HeartbeatSender\nfrom flwr.app import Message\n",
                     encoding="utf-8")
    assert flower_internals([probe]) == [f"{probe}:1 imports flwr.supercore.heartbeat"]
