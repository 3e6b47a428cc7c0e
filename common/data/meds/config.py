"""A MEDS site's data description (``kind: meds`` in its ``site.yaml``).

A hospital that already holds its data in MEDS points fedmeta at the dataset and at one label file
per prediction task; relative paths are relative to the YAML file::

    kind: meds
    name: hospital-01                 # optional, default: the YAML file's folder name
    path: meds                        # the MEDS dataset root (data/, metadata/)
    labels:                           # outcome name -> MEDS label file (Parquet)
      mortality: labels/mortality.parquet
      aki: labels/aki.parquet
    windows: [24h, all]               # optional: look-back windows before each prediction time
    aggregations:                     # optional
      numeric: [last, mean, min, max, count]   # codes with numeric values
      other: [present, count]                  # every other code
    min_subjects: 20                  # optional: a code is shared only if >= this many patients have it
    test_fraction: 0.34               # optional, used when there is no metadata/subject_splits.parquet
    seed: 43                          # optional, same

A window is ``all`` (the whole history) or a number and a unit: ``s``, ``min``, ``h``, ``d`` or
``w`` (``30min``, ``24h``, ``7d``). In a consortium the windows and aggregations every site uses
are those of the agreed :class:`~fedmeta.common.data.meds.vocabulary.Vocabulary`; the site's own
values are what it uses alone (``fedmeta data check``, a site-only vocabulary).

Errors are :class:`~fedmeta.common.errors.ConfigError` in the form ``FILE: key = value: what is
allowed``, as for the other site kinds (:mod:`fedmeta.common.data.site_config`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedmeta.common.config import read_yaml
from fedmeta.common.errors import ConfigError

SITE_FILE = "site.yaml"
#: Keys a ``kind: meds`` site file may hold.
MEDS_KEYS: tuple[str, ...] = (
    "kind",
    "name",
    "path",
    "labels",
    "windows",
    "aggregations",
    "min_subjects",
    "test_fraction",
    "seed",
)
#: Aggregations of a code with numeric values, and of any other code.
NUMERIC_AGGREGATIONS: tuple[str, ...] = ("count", "present", "first", "last", "mean", "min", "max")
OTHER_AGGREGATIONS: tuple[str, ...] = ("count", "present")
DEFAULT_WINDOWS: tuple[str, ...] = ("24h", "all")
DEFAULT_NUMERIC: tuple[str, ...] = ("last", "mean", "min", "max", "count")
DEFAULT_OTHER: tuple[str, ...] = ("present", "count")
DEFAULT_MIN_SUBJECTS = 20

_WINDOW = re.compile(r"^([1-9][0-9]*)(s|min|h|d|w)$")
_UNIT_US = {
    "s": 1_000_000,
    "min": 60_000_000,
    "h": 3_600_000_000,
    "d": 86_400_000_000,
    "w": 604_800_000_000,
}
WINDOW_HELP = "a window is 'all' or a positive number with a unit s, min, h, d or w (e.g. 24h, 7d)"


def window_us(window: str) -> int | None:
    """A window's length in microseconds (MEDS's time unit); ``None`` for ``all``."""
    if window == "all":
        return None
    m = _WINDOW.match(window)
    if m is None:
        raise ValueError(f"{window!r}: {WINDOW_HELP}")
    length = int(m.group(1)) * _UNIT_US[m.group(2)]
    if length > np.iinfo(np.int64).max // 4:
        raise ValueError(f"{window!r}: too long; use 'all' for the whole history")
    return length


def check_windows(windows: tuple[str, ...]) -> tuple[str, ...]:
    """Validate a window list: non-empty, each parseable, no repeats (also by length)."""
    if not windows:
        raise ValueError(f"expected a non-empty list; {WINDOW_HELP}")
    lengths = []
    for w in windows:
        if not isinstance(w, str):
            raise ValueError(f"{w!r}: {WINDOW_HELP}")
        lengths.append(window_us(w))
    if len(set(lengths)) != len(lengths):
        raise ValueError("windows repeat (the same length written twice?)")
    return windows


def _check_aggs(values: tuple[str, ...], allowed: tuple[str, ...]) -> tuple[str, ...]:
    if not values:
        raise ValueError(f"expected a non-empty list from {list(allowed)}")
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"{bad[0]!r} is not one of {list(allowed)}")
    if len(set(values)) != len(values):
        raise ValueError("aggregations repeat")
    return values


class Aggregations(BaseModel):
    """Which aggregations a window computes: ``numeric`` for codes the consortium saw with numeric
    values, ``other`` for every other code (diagnoses, admissions, static codes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    numeric: tuple[str, ...] = DEFAULT_NUMERIC
    other: tuple[str, ...] = DEFAULT_OTHER

    @field_validator("numeric")
    @classmethod
    def _numeric(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _check_aggs(v, NUMERIC_AGGREGATIONS)

    @field_validator("other")
    @classmethod
    def _other(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _check_aggs(v, OTHER_AGGREGATIONS)


def _resolve(p: Path, info: ValidationInfo) -> Path:
    source = (info.context or {}).get("source")
    p = p.expanduser()
    return p if p.is_absolute() or source is None else Path(source).parent / p


class MedsSiteConfig(BaseModel):
    """A validated ``kind: meds`` site file; paths resolved against the file's folder.

    ``labels`` maps each outcome (task) to its MEDS label file, in the file's order; that order is
    the order of the outcome columns of the loaded site. ``source`` is the YAML file itself, taken
    from the validation context ``{"source": path}`` (not a key of the file): relative paths are
    resolved against its folder and ``name`` defaults to that folder's name.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["meds"]
    source: Path = Field(default=Path("<memory>"), exclude=True)
    name: str = Field(min_length=1)
    path: Path
    labels: dict[str, Path]
    windows: tuple[str, ...] = DEFAULT_WINDOWS
    aggregations: Aggregations = Aggregations()
    min_subjects: Annotated[int, Strict(), Field(ge=1)] = DEFAULT_MIN_SUBJECTS
    test_fraction: Annotated[float, Strict(), Field(gt=0.0, lt=1.0)] | None = None
    seed: Annotated[int, Strict(), Field(ge=0)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_file(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, Mapping):
            return data
        if "source" in data:
            raise ValueError("'source' is not a key of a site file")
        source = Path((info.context or {}).get("source", "<memory>"))
        out = dict(data)
        out["source"] = source
        if "name" not in out:
            out["name"] = source.parent.name or "site"
        return out

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if "/" in v or not v.strip():
            raise ValueError("a site name is non-empty and has no '/'")
        return v.strip()

    @field_validator("path")
    @classmethod
    def _path(cls, v: Path, info: ValidationInfo) -> Path:
        return _resolve(v, info)

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_shape(cls, v: Any) -> Any:
        if not isinstance(v, Mapping) or not v:
            raise ValueError("expected a mapping of outcome name -> label Parquet file")
        for k, p in v.items():
            if not isinstance(k, str) or not k.strip():
                raise ValueError(f"outcome name {k!r}: expected a non-empty string")
            if not isinstance(p, str | Path) or not str(p).strip():
                raise ValueError(f"outcome {k!r}: {p!r} is not a file path")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, Path], info: ValidationInfo) -> dict[str, Path]:
        return {k.strip(): _resolve(p, info) for k, p in v.items()}

    @field_validator("windows", mode="before")
    @classmethod
    def _windows_shape(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list | tuple):
            raise ValueError(f"expected a list; {WINDOW_HELP}")
        return v

    @field_validator("windows")
    @classmethod
    def _windows(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return check_windows(v)

    @property
    def outcomes(self) -> tuple[str, ...]:
        """Outcome names in the site file's order."""
        return tuple(self.labels)


def _message(err: dict[str, Any], data: Mapping[str, Any]) -> str:
    """``key = value: what is allowed`` for one pydantic error."""
    loc = [str(x) for x in err.get("loc", ())]
    key = ".".join(loc) if loc else "(file)"
    value = err.get("input")
    if err.get("type") == "extra_forbidden":
        parent = loc[0] if loc else ""
        allowed = ", ".join(Aggregations.model_fields) if parent == "aggregations" else ""
        return f"{key}: unknown key; allowed: {allowed}"
    if err.get("type") == "missing":
        return f"key {key!r} is required"
    if len(loc) >= 1 and loc[0] in data and len(loc) == 1:
        value = data[loc[0]]
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    return f"{key} = {value!r}: {msg}"


def parse_meds_site(data: Mapping[str, Any], *, source: str | Path) -> MedsSiteConfig:
    """Validate parsed YAML ``data`` read from ``source`` into a :class:`MedsSiteConfig`.

    Unknown keys, a wrong kind and bad values raise :class:`ConfigError` naming the file, the key
    and the value, with what is allowed.
    """
    src = Path(source)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{src}: a site file is a mapping of keys, got {type(data).__name__}")
    if data.get("kind") != "meds":
        raise ConfigError(f"{src}: kind = {data.get('kind')!r}: expected 'meds'")
    unknown = sorted(str(k) for k in data if k not in MEDS_KEYS)
    if unknown:
        raise ConfigError(
            f"{src}: unknown key {unknown[0]!r} for kind meds; allowed: {', '.join(MEDS_KEYS)}"
        )
    try:
        return MedsSiteConfig.model_validate(data, context={"source": src})
    except ValidationError as e:
        raise ConfigError(f"{src}: {_message(dict(e.errors()[0]), data)}") from e


def load_meds_site_config(path: str | Path) -> MedsSiteConfig:
    """Read and validate a ``kind: meds`` site file (a folder means ``folder/site.yaml``)."""
    p = Path(path)
    if p.is_dir():
        p = p / SITE_FILE
    if not p.is_file():
        raise ConfigError(f"{p}: site file not found")
    return parse_meds_site(read_yaml(p), source=p)
