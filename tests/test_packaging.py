"""The wheel must contain every subpackage: pyproject lists them explicitly (namespace layout)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    mapping = tool["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    assert found == listed, f"unlisted: {sorted(found - listed)}; listed but missing: {sorted(listed - found)}"


def test_flower_app_components_point_at_the_apps():
    from importlib import import_module

    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    for key in ("serverapp", "clientapp"):
        module, _, attr = app[key].partition(":")
        obj = getattr(import_module(module), attr)
        assert type(obj).__name__ == {"serverapp": "ServerApp", "clientapp": "ClientApp"}[key]
