"""A site's data configuration (``site.yaml``): what data it holds and how to read it.

A hospital describes its own data in one YAML file; relative paths are relative to that file.
Tables (``kind: ehr``)::

    kind: ehr
    name: hospital-01            # optional, default: the folder's name
    path: stays.csv              # CSV or Parquet, one row per stay
    schema: ../schema.yaml       # the experiment's feature schema
    outcomes: [mortality, los_gt_7d]
    unit_column: first_careunit  # optional
    id_column: stay_id           # optional, checked unique
    test_fraction: 0.34          # optional, default: the experiment's data.test_fraction
    seed: 43                     # optional, default: the experiment's data.split_seed
    missing_indicators: true     # optional

Images (``kind: images``)::

    kind: images
    path: images.npz             # MedMNIST .npz, or a folder with one sub-folder per class
    classes: [normal, lesion]    # optional names of label 0, 1, ... (.npz)
    image_size: [28, 28]         # optional, folders: resize every image
    grayscale: true              # optional, folders
    use_val: true                # optional, .npz: val_* joins training

Unknown keys are refused; every error names the file, the key and the value. This module only
parses; :mod:`fedmeta.common.data.ehr` and :mod:`fedmeta.common.data.images` load the data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmeta.common.config import read_yaml
from fedmeta.common.errors import ConfigError

SITE_FILE = "site.yaml"
_COMMON = ("kind", "name", "path", "test_fraction", "seed")
EHR_KEYS: tuple[str, ...] = _COMMON + (
    "schema",
    "outcomes",
    "unit_column",
    "id_column",
    "missing_indicators",
)
IMAGE_KEYS: tuple[str, ...] = _COMMON + ("classes", "image_size", "grayscale", "use_val")


@dataclass(frozen=True)
class EhrSiteConfig:
    """A validated ``kind: ehr`` site file; paths resolved; ``None`` = use the experiment's."""

    source: Path
    name: str
    path: Path
    schema: Path
    outcomes: tuple[str, ...]
    unit_column: str | None = None
    id_column: str | None = None
    test_fraction: float | None = None
    seed: int | None = None
    missing_indicators: bool = True

    @property
    def kind(self) -> str:
        return "ehr"


@dataclass(frozen=True)
class ImageSiteConfig:
    """A validated ``kind: images`` site file (an ``.npz`` file or a class-folder tree)."""

    source: Path
    name: str
    path: Path
    classes: tuple[str, ...] | None = None
    image_size: tuple[int, int] | None = None
    grayscale: bool = True
    use_val: bool = True
    test_fraction: float | None = None
    seed: int | None = None

    @property
    def kind(self) -> str:
        return "images"

    @property
    def is_folder(self) -> bool:
        return self.path.suffix.lower() != ".npz"


SiteConfig = EhrSiteConfig | ImageSiteConfig


class _Reader:
    """Typed access to one YAML mapping; every error names the file, key and value."""

    def __init__(self, data: Mapping[str, Any], source: Path) -> None:
        self.data = data
        self.source = source

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key} = {self.data.get(key)!r}: {message}")

    def string(self, key: str, *, required: bool = False) -> str | None:
        if key not in self.data or self.data[key] is None:
            if required:
                raise ConfigError(f"{self.source}: key {key!r} is required")
            return None
        value = self.data[key]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, "expected a non-empty string")
        return value.strip()

    def path(self, key: str) -> Path:
        text = self.string(key, required=True)
        assert text is not None
        p = Path(text).expanduser()
        return p if p.is_absolute() else (self.source.parent / p)

    def strings(self, key: str, *, required: bool = False) -> tuple[str, ...] | None:
        if key not in self.data:
            if required:
                raise ConfigError(f"{self.source}: key {key!r} is required (a list of names)")
            return None
        value = self.data[key]
        if isinstance(value, str):
            value = [value]
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, str | int) and str(v).strip() for v in value)
        ):
            raise self.fail(key, "expected a non-empty list of names")
        names = tuple(str(v).strip() for v in value)
        if len(set(names)) != len(names):
            raise self.fail(key, "names repeat")
        return names

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, "expected true or false")
        return value

    def fraction(self, key: str) -> float | None:
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
            raise self.fail(key, "expected a number in (0, 1)")
        return float(value)

    def seed(self, key: str) -> int | None:
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(key, "expected an integer >= 0")
        return value


def parse_site_config(data: Any, *, source: str | Path) -> SiteConfig:
    """Validate parsed YAML ``data`` read from ``source`` into a site configuration."""
    src = Path(source)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{src}: a site file is a mapping of keys, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in ("ehr", "images"):
        raise ConfigError(f"{src}: kind = {kind!r}: expected 'ehr' (a table of stays) or 'images'")
    allowed = EHR_KEYS if kind == "ehr" else IMAGE_KEYS
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{src}: unknown key {unknown[0]!r} for kind {kind}; allowed: {', '.join(allowed)}"
        )
    r = _Reader(data, src)
    name = r.string("name") or src.parent.name
    if "/" in name:
        raise r.fail("name", "a site name must not contain '/'")
    if kind == "ehr":
        outcomes = r.strings("outcomes", required=True)
        assert outcomes is not None
        unit, ident = r.string("unit_column"), r.string("id_column")
        if unit and unit in outcomes:
            raise r.fail("unit_column", "is also an outcome")
        return EhrSiteConfig(
            source=src,
            name=name,
            path=r.path("path"),
            schema=r.path("schema"),
            outcomes=outcomes,
            unit_column=unit,
            id_column=ident,
            test_fraction=r.fraction("test_fraction"),
            seed=r.seed("seed"),
            missing_indicators=r.boolean("missing_indicators", True),
        )
    size = data.get("image_size")
    image_size: tuple[int, int] | None = None
    if size is not None:
        if (
            not isinstance(size, list)
            or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 2 for v in size)
        ):
            raise r.fail("image_size", "expected [height, width], integers >= 2")
        image_size = (size[0], size[1])
    return ImageSiteConfig(
        source=src,
        name=name,
        path=r.path("path"),
        classes=r.strings("classes"),
        image_size=image_size,
        grayscale=r.boolean("grayscale", True),
        use_val=r.boolean("use_val", True),
        test_fraction=r.fraction("test_fraction"),
        seed=r.seed("seed"),
    )


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site YAML file (a folder means ``folder/site.yaml``)."""
    p = Path(path)
    if p.is_dir():
        p = p / SITE_FILE
    if not p.is_file():
        raise ConfigError(f"{p}: site file not found")
    return parse_site_config(read_yaml(p), source=p)


def find_site_configs(root: str | Path) -> list[SiteConfig]:
    """Every ``root/<folder>/site.yaml``, in folder order; names must be unique."""
    r = Path(root)
    if not r.is_dir():
        raise ConfigError(
            f"data.path = {str(root)!r}: folder not found (expected one sub-folder "
            f"per site, each with a {SITE_FILE})"
        )
    configs = [
        load_site_config(d / SITE_FILE) for d in sorted(r.iterdir()) if (d / SITE_FILE).is_file()
    ]
    if not configs:
        raise ConfigError(f"data.path = {str(root)!r}: no <site>/{SITE_FILE} found in it")
    seen: dict[str, Path] = {}
    for c in configs:
        if c.name in seen:
            raise ConfigError(f"{c.source}: site name {c.name!r} is also used by {seen[c.name]}")
        seen[c.name] = c.source
    return configs
