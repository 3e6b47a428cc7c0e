"""fedmeta: federated meta-learning for hospitals.

The Python API a hospital uses on its own patients, after ``fedmeta adapt`` wrote a site model
bundle::

    import pandas as pd
    import fedmeta

    model = fedmeta.load_site_model("adapted-Cleveland.fedmeta")
    risks = model.predict_proba(pd.read_csv("new_patients.csv"))   # risk and decision per patient

Names are imported on first use, so ``import fedmeta`` stays cheap (the command line imports
only what a command needs).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# No outbound connection but the Fleet API: Flower posts a telemetry event from every SuperLink,
# SuperNode and simulation unless FLWR_TELEMETRY_ENABLED is "0", read once when Flower's
# telemetry module is imported. Every fedmeta process (and every process it starts, which
# inherits the environment) keeps it off unless the operator set the variable. The update check
# is a separate switch.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

if TYPE_CHECKING:
    from fedmeta.common.bundle import SiteModel, SiteModelBundle, load_site_model

__all__ = ["SiteModel", "SiteModelBundle", "__version__", "load_site_model"]

_LAZY = {
    "load_site_model": "fedmeta.common.bundle",
    "SiteModel": "fedmeta.common.bundle",
    "SiteModelBundle": "fedmeta.common.bundle",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("fedmeta")
        except PackageNotFoundError:
            return "unknown"
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedmeta' has no attribute {name!r}")
