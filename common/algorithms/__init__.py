"""fedmeta's algorithms, one record each (see :mod:`fedmeta.common.algorithms.base`)."""

from fedmeta.common.algorithms.base import Algorithm, SiteWork, StepResult
from fedmeta.common.algorithms.registry import get, names, register, unregister

__all__ = ["Algorithm", "SiteWork", "StepResult", "get", "names", "register", "unregister"]
