"""What "the fedmeta app" is, for the coordinator that submits it and the sites that accept it.

A run is submitted as a Flower app bundle (FAB) holding one file, the ``pyproject.toml`` written
by :func:`render_pyproject`: publisher ``fedmeta``, name ``fedmeta``, the installed version, and
the components (``fedmeta.server.app:app`` and ``fedmeta.client.app:app``, or the SecAgg+ pair).
The bundle carries no code: the coordinator and every hospital run the fedmeta they installed.
Both accept a bundle only when it is exactly that (:func:`check_bundle`: the site worker before
it serves a task, the coordinator's executor before it starts the ServerApp), and a site can pin
the installed code itself by :func:`code_digest`.
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

PUBLISHER = "fedmeta"
NAME = "fedmeta"
FAB_ID = f"{PUBLISHER}/{NAME}"
COMPONENTS = {
    False: {"serverapp": "fedmeta.server.app:app", "clientapp": "fedmeta.client.app:app"},
    True: {"serverapp": "fedmeta.server.secagg_app:app", "clientapp": "fedmeta.client.secagg_app:app"},
}
#: The only files a fedmeta bundle may hold (Flower adds ``.info/CONTENT``, the files' hashes).
BUNDLE_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})
#: Packages whose installed source the code digest covers: everything a site or coordinator runs.
PACKAGES = ("common", "sitecore", "protocol", "client", "server", "deploy", "cli")


def render_pyproject(*, version: str, secure_aggregation: bool = False) -> str:
    """The ``pyproject.toml`` of the bundle submitted for a run (no dependencies: the sites and
    the coordinator run what they installed, so Flower has nothing to install at run time)."""
    components = COMPONENTS[secure_aggregation]
    return "\n".join([
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "{NAME}"',
        f'version = "{version}"',
        'description = "fedmeta run bundle: the coordinator and the sites run their installed fedmeta"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        f'publisher = "{PUBLISHER}"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{components["serverapp"]}"',
        f'clientapp = "{components["clientapp"]}"',
        "",
        "[tool.flwr.app.config]",
        'experiment = ""',
        'config = ""',
        'set = ""',
        'run-name = ""',
        "resume = false",
        "",
    ])


@dataclass(frozen=True)
class BundleVerdict:
    """Whether a bundle is accepted; ``secure_aggregation`` says which fedmeta pair serves it;
    ``reason`` (when refused) is for the refusing side's own log."""

    accepted: bool
    reason: str = ""
    secure_aggregation: bool = False


def check_bundle(content: bytes, *, fab_id: str, fab_version: str, version: str,
                 allow_secure_aggregation: bool) -> BundleVerdict:
    """Accept only a fedmeta bundle of ``version`` that holds no code.

    Refused: anything that is not a zip; a bundle with any file besides ``pyproject.toml``;
    another publisher, name or version; components other than exactly fedmeta's own pair of
    ServerApp and ClientApp (or its SecAgg+ pair when the site allows secure aggregation): a
    bundle whose ServerApp is someone else's code is refused at the site too, so a hostile
    ServerApp cannot lean on the sites' trust in fedmeta's name.
    """
    if fab_id != FAB_ID:
        return BundleVerdict(False, f"app {fab_id!r} is not {FAB_ID!r}")
    if fab_version != version:
        return BundleVerdict(False, f"app version {fab_version!r} is not the installed {version!r}")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as z:
            names = set(z.namelist())
            extra = sorted(names - BUNDLE_FILES)
            if extra:
                return BundleVerdict(False, f"the bundle carries files ({', '.join(extra[:5])}); "
                                            "fedmeta runs only its installed code")
            project = tomllib.loads(z.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        return BundleVerdict(False, f"not a readable app bundle: {type(e).__name__}")
    name = project.get("project", {}).get("name")
    declared = project.get("project", {}).get("version")
    app = project.get("tool", {}).get("flwr", {}).get("app", {})
    if name != NAME or declared != version or app.get("publisher") != PUBLISHER:
        return BundleVerdict(False, f"the bundle declares {app.get('publisher')}/{name} {declared}")
    components = app.get("components", {})
    for secure in (False, True):
        if components == COMPONENTS[secure]:
            if secure and not allow_secure_aggregation:
                return BundleVerdict(False, "secure aggregation runs are not allowed by this site")
            return BundleVerdict(True, secure_aggregation=secure)
    if not isinstance(components, dict):
        return BundleVerdict(False, "the bundle's components are not a table")
    foreign = sorted(f"{k}={str(v)[:80]!r}" for k, v in components.items()
                     if v not in (COMPONENTS[False].get(k), COMPONENTS[True].get(k)))
    if foreign:
        return BundleVerdict(False, f"components not fedmeta's: {', '.join(foreign[:3])}")
    return BundleVerdict(False, "the components are not one of fedmeta's pairs "
                                f"({', '.join(f'{k}={v!r}' for k, v in sorted(components.items()))[:200]})")

def code_digest() -> str:
    """SHA-256 over the installed fedmeta source (the top-level ``fedmeta/__init__.py`` and every
    ``.py`` file of :data:`PACKAGES`, by relative path and content): what ``fedmeta site pin`` records and a site checks at start."""
    import importlib

    import fedmeta

    h = hashlib.sha256()
    top = Path(str(fedmeta.__file__))  # `import fedmeta.<anything>` runs it first
    h.update(b"__init__.py\0" + top.read_bytes() + b"\0")
    for package in PACKAGES:
        module = importlib.import_module(f"fedmeta.{package}")
        root = Path(next(iter(module.__path__)))
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            h.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
            h.update(path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()
