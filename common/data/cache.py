"""Where generated (synthetic) data sets live, and generating one exactly once.

Simulated sites may start in parallel (Ray workers); :func:`ensure_generated` writes into a
private temporary folder and renames it into place, so a reader never sees a half-written data
set and two writers do not mix their files.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DONE_FILE = "generator.json"


def cache_root() -> Path:
    """``$FEDMETA_CACHE`` if set, else ``$XDG_CACHE_HOME/fedmeta`` (``~/.cache/fedmeta``)."""
    env = os.environ.get("FEDMETA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fedmeta"


def ensure_generated(target: Path, generate: Callable[[Path], object]) -> Path:
    """Return ``target``, first running ``generate(folder)`` if ``target/generator.json`` is
    absent. Generation happens in a temporary sibling folder renamed to ``target`` at the end."""
    if (target / DONE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        log.info("generating %s (first use)", target)
        generate(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / DONE_FILE).is_file():  # not a concurrent writer's finished copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
