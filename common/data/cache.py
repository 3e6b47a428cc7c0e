"""Where generated (synthetic) data sets live, and generating one exactly once.

Simulated sites may start in parallel (Ray workers); :func:`ensure_generated` writes into a
private temporary folder and renames it into place, so a reader never sees a half-written data
set and two writers do not mix their files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from fedmeta.common.errors import ConfigError

log = logging.getLogger(__name__)

DONE_FILE = "generator.json"


def cache_root() -> Path:
    """``$FEDMETA_CACHE`` if set, else ``$XDG_CACHE_HOME/fedmeta`` (``~/.cache/fedmeta``)."""
    env = os.environ.get("FEDMETA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fedmeta"


def _check_record(target: Path, expect: Mapping[str, object]) -> Path:
    """``target`` if its ``generator.json`` holds ``expect``'s values, else a ConfigError."""
    try:
        record = json.loads((target / DONE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{target / DONE_FILE}: unreadable generator record: {e}") from e
    wrong = {k: record.get(k) for k, v in expect.items() if record.get(k) != v}
    if wrong:
        raise ConfigError(
            f"{target}: holds data generated with {wrong}, but the experiment asks for "
            f"{ {k: expect[k] for k in wrong} }; point data.path at another folder"
        )
    return target


def ensure_generated(
    target: Path,
    generate: Callable[[Path], object],
    *,
    expect: Mapping[str, object] | None = None,
) -> Path:
    """Return ``target``, first running ``generate(folder)`` if ``target/generator.json`` is
    absent. Generation happens in a temporary sibling folder renamed to ``target`` at the end.
    ``expect``: values the generator record must hold (a folder made with other settings
    raises :class:`ConfigError` rather than being used)."""
    if (target / DONE_FILE).is_file():
        return _check_record(target, expect or {})
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
    return _check_record(target, expect or {})
