"""``algorithm`` name -> :class:`~fedmeta.common.algorithms.base.Algorithm`.

The built-in algorithms are listed here, one line each; :func:`register` adds one at run time
(for example a research prototype, or a test's toy algorithm) and the experiment config accepts
its name from then on.
"""

from __future__ import annotations

import importlib

from fedmeta.common.algorithms.base import Algorithm
from fedmeta.common.errors import ConfigError

#: The built-in algorithms' modules under ``fedmeta.common.algorithms``, one line each; a module
#: defines ``ALGORITHM`` (or ``ALGORITHMS``, several records), registered in this order.
BUILTINS: tuple[str, ...] = (
    "reptile",
    "maml",  # fomaml, maml
    "metasgd",
    "protonet",
    "matching",
    "relation",
    "fedavg",
    "glm",
)

_ALGORITHMS: dict[str, Algorithm] = {}


def register(algorithm: Algorithm, *, replace: bool = False) -> None:
    """Make ``algorithm`` available under its name (``replace`` to swap an existing one)."""
    if algorithm.name in _ALGORITHMS and not replace:
        raise ValueError(f"algorithm {algorithm.name!r} is already registered")
    _ALGORITHMS[algorithm.name] = algorithm


def unregister(name: str) -> None:
    """Remove a run-time registration (tests)."""
    _ALGORITHMS.pop(name, None)


def names() -> tuple[str, ...]:
    """Every registered algorithm's name, built-ins first."""
    return tuple(_ALGORITHMS)


def get(name: str) -> Algorithm:
    """The algorithm called ``name``; a :class:`ConfigError` lists the known ones."""
    try:
        return _ALGORITHMS[name]
    except KeyError:
        known = ", ".join(repr(n) for n in _ALGORITHMS)
        raise ConfigError(f"algorithm = {name!r}: expected one of {known}") from None


for _module in BUILTINS:
    _records = importlib.import_module(f"fedmeta.common.algorithms.{_module}")
    for _builtin in getattr(_records, "ALGORITHMS", None) or (_records.ALGORITHM,):
        register(_builtin)
