"""A run's name: the folder its outputs go to, chosen by the operator or made from the time.

It travels in the run config (``run-name``) from the operator's command to the ServerApp, which
checks it again before it names a folder: letters, digits, ``.``, ``_`` and ``-``, never a path.
"""

from __future__ import annotations

import re
import time

from fedmeta.common.errors import ConfigError

PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def new(prefix: str) -> str:
    """``<prefix>-<YYYYmmdd-HHMMSS>`` (local time), e.g. ``reptile-20261207-221500``."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def check(name: str) -> str:
    """``name`` if it is a run folder name (letters, digits, ``.``, ``_``, ``-``; no path)."""
    if not PATTERN.match(name):
        raise ConfigError(f"run name {name!r}: use letters, digits, '.', '_' and '-' only")
    return name


def chosen(given: str, prefix: str) -> str:
    """The name the operator gave (checked), or a new one made from ``prefix``."""
    return check(given or new(prefix))
