"""A site's data description (``site.yaml``): what data a hospital holds and how to read it.

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

MEDS exports (``kind: meds``): see :mod:`fedmeta.common.data.meds.config`.

This file is not the site's *node file* (``node.yaml`` in the bundle ``fedmeta provision``
writes), which says how the hospital's node reaches the coordinator and which data description
it serves; each loader recognises the other file and says which one it wants.

Read like every fedmeta YAML file (:mod:`fedmeta.common.yamlio`): unknown keys are refused and
every error names the file, the key and the value. This module only parses;
:mod:`fedmeta.common.data.ehr` and :mod:`fedmeta.common.data.images` load the data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedmeta.common.errors import ConfigError
from fedmeta.common.yamlio import Bool, YamlModel, fail, read_mapping, validate

SITE_FILE = "site.yaml"
#: Keys that only a node file (``node.yaml``) holds: a data loader given one says so.
NODE_FILE_KEYS = frozenset({"superlink", "auth_private_key", "root_certificates"})


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise fail("expected a non-empty string")
    return value.strip()


def _names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(v, str | int) and not isinstance(v, bool) and str(v).strip()
                   for v in value)
    ):
        raise fail("expected a non-empty list of names")
    out = tuple(str(v).strip() for v in value)
    if len(set(out)) != len(out):
        raise fail("names repeat")
    return out


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise fail("expected a number in (0, 1)")
    return float(value)


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise fail("expected an integer >= 0")
    return value


Text = Annotated[str, BeforeValidator(_text)]
Names = Annotated[tuple[str, ...], BeforeValidator(_names)]
SplitFraction = Annotated[float, BeforeValidator(_fraction)]
Seed = Annotated[int, BeforeValidator(_seed)]


class _SiteData(YamlModel):
    """Keys every data description has; ``source`` is the file it was read from (not a key)."""

    kind: str
    source: Path = Field(default=Path("<memory>"), exclude=True)
    name: Text = ""
    path: Path
    test_fraction: SplitFraction | None = None
    seed: Seed | None = None

    _path_keys: ClassVar[tuple[str, ...]] = ("path",)

    @classmethod
    def unknown_key_message(cls, key: str, value: Any, allowed: Sequence[str], section: str) -> str:
        shown = [k for k in allowed if k != "source"]
        kind = cls.model_fields["kind"].default or ""
        return f"unknown key {key!r} for kind {kind}; allowed: {', '.join(shown)}"

    @model_validator(mode="before")
    @classmethod
    def _from_file(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, Mapping):
            return data
        if "source" in data:
            raise fail(cls.unknown_key_message("source", data["source"], list(cls.model_fields), ""),
                       key="source")
        ctx = info.context or {}
        source = Path(ctx.get("source", "<memory>"))
        out = dict(data)
        out["source"] = source
        if not out.get("name") and "name" not in data:
            out["name"] = source.parent.name
        for key in cls._path_keys:
            if key in out:
                raw = out[key]
                if not isinstance(raw, str) or not raw.strip():
                    raise fail("expected a non-empty string", value=raw, key=key)
                p = Path(raw.strip()).expanduser()
                out[key] = p if p.is_absolute() else source.parent / p
        return out

    @field_validator("name")
    @classmethod
    def _no_slash(cls, value: str) -> str:
        if "/" in value:
            raise fail("a site name must not contain '/'")
        return value


class EhrSiteConfig(_SiteData):
    """A validated ``kind: ehr`` site file; paths resolved; ``None`` = use the experiment's."""

    kind: Literal["ehr"] = "ehr"
    schema_path: Path = Field(alias="schema")
    outcomes: Names
    unit_column: Text | None = None
    id_column: Text | None = None
    missing_indicators: Bool = True

    _path_keys: ClassVar[tuple[str, ...]] = ("path", "schema")

    @property
    def schema(self) -> Path:  # type: ignore[override]
        """The experiment's feature schema file."""
        return self.schema_path

    @model_validator(mode="after")
    def _unit_is_not_an_outcome(self) -> EhrSiteConfig:
        if self.unit_column and self.unit_column in self.outcomes:
            raise fail("is also an outcome", value=self.unit_column, key="unit_column")
        return self


def _image_size(value: Any) -> tuple[int, int]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 2 for v in value)
    ):
        raise fail("expected [height, width], integers >= 2")
    return (value[0], value[1])


class ImageSiteConfig(_SiteData):
    """A validated ``kind: images`` site file (an ``.npz`` file or a class-folder tree)."""

    kind: Literal["images"] = "images"
    classes: Names | None = None
    image_size: Annotated[tuple[int, int], BeforeValidator(_image_size)] | None = None
    grayscale: Bool = True
    use_val: Bool = True

    @property
    def is_folder(self) -> bool:
        return self.path.suffix.lower() != ".npz"


SiteConfig = EhrSiteConfig | ImageSiteConfig

#: ``kind`` -> its model; a new kind of site data registers here (see :func:`register_kind`).
KINDS: dict[str, type[_SiteData]] = {"ehr": EhrSiteConfig, "images": ImageSiteConfig}
_KIND_HELP = {"ehr": "'ehr' (a table of stays)", "images": "'images'",
              "meds": "'meds' (a MEDS dataset and its label files)"}
#: ``kind`` -> a parser of its own (``parse(data, source=...)``), for kinds whose model words
#: its own errors rather than through :func:`fedmeta.common.yamlio.validate`.
_PARSERS: dict[str, Callable[..., Any]] = {}
#: Modules that register the other built-in kinds, imported when such a file is first read.
_BUILTIN_KINDS = {"meds": "fedmeta.common.data.meds.source"}


def register_kind(kind: str, model: type[BaseModel], help_text: str,
                  parse: Callable[..., Any] | None = None) -> None:
    """Accept ``kind: <kind>`` data descriptions, validated by ``model`` (a
    :class:`~fedmeta.common.yamlio.YamlModel`), or by ``parse(data, source=path)`` when given."""
    KINDS[kind] = model  # type: ignore[assignment]
    _KIND_HELP[kind] = help_text
    if parse is not None:
        _PARSERS[kind] = parse


def parse_site_config(data: Any, *, source: str | Path) -> Any:
    """Validate parsed YAML ``data`` read from ``source`` into a site data description."""
    src = Path(source)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{src}: a site file is a mapping of keys, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in KINDS and isinstance(kind, str) and kind in _BUILTIN_KINDS:
        import importlib

        importlib.import_module(_BUILTIN_KINDS[kind])
    if kind not in KINDS:
        if "kind" not in data and NODE_FILE_KEYS & set(data):
            raise ConfigError(
                f"{src}: this is a site's node file (it names {sorted(NODE_FILE_KEYS & set(data))[0]}), "
                "not a data description; pass the data description it names under 'data' "
                "(a YAML with kind: ehr, images or meds)"
            )
        allowed = " or ".join(_KIND_HELP[k] for k in dict.fromkeys([*KINDS, *_BUILTIN_KINDS]))
        raise ConfigError(f"{src}: kind = {kind!r}: expected {allowed}")
    if kind in _PARSERS:
        return _PARSERS[kind](data, source=src)
    return validate(KINDS[kind], data, source=src, context={"source": src})


def load_site_config(path: str | Path) -> Any:
    """Read and validate a site data description (a folder means ``folder/site.yaml``)."""
    p = Path(path)
    if p.is_dir():
        p = p / SITE_FILE
    if not p.is_file():
        raise ConfigError(f"{p}: site file not found")
    return parse_site_config(read_mapping(p, what="site file"), source=p)


def find_site_configs(root: str | Path) -> list[Any]:
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
