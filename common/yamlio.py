"""One way to read every fedmeta YAML file: ``yaml.safe_load``, then one pydantic v2 model.

Experiments, site data descriptions, site node files and consortia are all read here:

1. :func:`read_mapping` reads the file with ``yaml.safe_load`` (never a Python object) and checks
   that it holds a mapping; a missing file, unreadable YAML or a list at the top level is a
   :class:`~fedmeta.common.errors.ConfigError` naming the file.
2. :func:`validate` builds the model (unknown keys forbidden, values frozen) and turns every
   pydantic error into one ``ConfigError`` that names the file, the dotted key, the value and
   what is allowed, e.g. ``exp.yaml: inner.lr = -1.0: must be > 0``.

The field types below (:data:`Int`, :data:`Float`, :func:`number`, …) are strict in the way YAML
needs: ``true`` is not an integer, ``2.5`` is not a round count, and ``1e-3`` (which YAML 1.1
reads as a string) is a float. Messages may hold ``{key}`` and ``{value}``: then they are the
whole message (``coordinator.fleet_port must be in [1, 65535], got 70000``); otherwise they
follow ``key = value:``.

A family of files can word its unknown-key and missing-key messages its own way by overriding
:meth:`YamlModel.unknown_key_message` and :meth:`YamlModel.missing_key_message`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from fedmeta.common.errors import ConfigError

M = TypeVar("M", bound="YamlModel")

_FEDMETA = "fedmeta"


def fail(message: str, *, value: Any = None, key: str | None = None) -> PydanticCustomError:
    """An error for a validator to raise: ``message`` is what is wrong or allowed; ``value``
    (when given) is shown instead of the raw input; ``key`` overrides the dotted key."""
    ctx: dict[str, Any] = {"fedmeta_message": message}
    if value is not None:
        ctx["shown"] = repr(value)
    if key is not None:
        ctx["key"] = key
    return PydanticCustomError(_FEDMETA, "{fedmeta_message}", ctx)


class YamlModel(BaseModel):
    """Base of every model read from YAML: unknown keys forbidden, instances frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=False)

    #: How this family names its keys in messages ("dotted": ``a.b``; "quoted": ``'a.b'``).
    key_style: ClassVar[str] = "dotted"

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen; build a new one instead")

    @classmethod
    def unknown_key_message(cls, key: str, value: Any, allowed: Sequence[str], section: str) -> str:
        where = f"under {section}" if section else "under the top level"
        return f"unknown key {key}; allowed {where}: {', '.join(allowed)}"

    @classmethod
    def missing_key_message(cls, key: str) -> str:
        return f"key {key!r} is required"


# -- the YAML file -------------------------------------------------------------------------------


def read_document(path: str | Path, *, what: str = "config file") -> Any:
    """Read ``path`` with ``yaml.safe_load``: the parsed document, whatever it holds."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"{p}: {what} not found") from e
    except IsADirectoryError as e:
        raise ConfigError(f"{p}: is a folder, expected a {what}") from e
    except OSError as e:
        raise ConfigError(f"{p}: cannot read {what}: {e}") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e


def read_mapping(path: str | Path, *, what: str = "config file") -> dict[str, Any]:
    """Read ``path`` with ``yaml.safe_load``; an empty file is ``{}``, a non-mapping an error."""
    data = read_document(path, what=what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


# -- building a model and explaining its errors -----------------------------------------------------


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _submodel(model: type[YamlModel], loc: Sequence[str | int]) -> type[YamlModel] | None:
    """The model class reached by following ``loc`` (list indices skipped) from ``model``."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return None
        current = _model_in(fields[part].annotation)
        if current is None:
            return None
    return current if isinstance(current, type) and issubclass(current, YamlModel) else None


def _model_in(annotation: Any) -> type[YamlModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, YamlModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _value_at(data: Any, loc: Sequence[str | int]) -> Any:
    node = data
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _explain(model: type[YamlModel], data: Any, error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    kind = error["type"]
    ctx = error.get("ctx") or {}
    key = str(ctx.get("key") or _dotted(loc))
    shown_key = repr(key) if model.key_style == "quoted" else key
    value = ctx.get("shown", repr(error.get("input")))
    if kind == "extra_forbidden":
        parent = _submodel(model, loc[:-1]) or model
        allowed = list(parent.model_fields)
        return parent.unknown_key_message(shown_key, error.get("input"), allowed, _dotted(loc[:-1]))
    if kind == "missing":
        return model.missing_key_message(key)
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"{shown_key} = {value}: expected a mapping of settings"
    if kind == "literal_error":
        return f"{shown_key} = {value}: expected one of {ctx.get('expected', '')}".replace(" or ", ", ")
    if kind == _FEDMETA:
        message = str(ctx.get("fedmeta_message", error["msg"]))
        if "{key}" in message or "{value}" in message:
            return message.replace("{key}", key).replace("{value}", value)
        return f"{shown_key} = {value}: {message}"
    return f"{shown_key} = {value}: {error['msg']}"


def validate(model: type[M], data: Any, *, source: str | Path,
             context: Mapping[str, Any] | None = None) -> M:
    """Build ``model`` from parsed YAML ``data``; errors become one :class:`ConfigError`
    (the first problem, in file order) that starts with ``source``. ``context`` reaches the
    model's validators (e.g. the file's folder, to resolve relative paths)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return model.model_validate(data, context=dict(context or {}))
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        raise ConfigError(f"{source}: {_explain(model, data, first)}") from None


# -- field types for YAML values ------------------------------------------------------------------


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail("expected int")
    return value


def _float(value: Any) -> float:
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise fail("expected float") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail("expected float")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise fail("expected true or false")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise fail("expected str")
    return value


Int = Annotated[int, BeforeValidator(_int)]
Float = Annotated[float, BeforeValidator(_float)]
Bool = Annotated[bool, BeforeValidator(_bool)]
Str = Annotated[str, BeforeValidator(_str)]


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"must be {'>' if lo_open else '>='} {lo:g}"
    assert hi is not None
    return f"must be {'<' if hi_open else '<='} {hi:g}"


def _bounded(convert: Callable[[Any], Any], lo: float | None, hi: float | None, lo_open: bool,
             hi_open: bool, message: str | None) -> Callable[[Any], Any]:
    text = message or _interval(lo, hi, lo_open, hi_open)

    def check(value: Any) -> Any:
        v = convert(value)
        low_bad = lo is not None and (v <= lo if lo_open else v < lo)
        high_bad = hi is not None and (v >= hi if hi_open else v > hi)
        if low_bad or high_bad:
            raise fail(text, value=v)
        return v

    return check


def number(*, gt: float | None = None, ge: float | None = None, lt: float | None = None,
           le: float | None = None, message: str | None = None) -> BeforeValidator:
    """For ``Annotated[float, number(...)]``: a float bounded by ``gt``/``ge``/``lt``/``le``;
    the message says the interval."""
    lo, lo_open = (gt, True) if gt is not None else (ge, False)
    hi, hi_open = (lt, True) if lt is not None else (le, False)
    return BeforeValidator(_bounded(_float, lo, hi, lo_open, hi_open, message))


def integer(*, ge: int | None = None, le: int | None = None, message: str | None = None) -> BeforeValidator:
    """For ``Annotated[int, integer(...)]``: an int (``true`` and ``2.5`` refused) bounded by
    ``ge``/``le``."""
    return BeforeValidator(_bounded(_int, ge, le, False, False, message))


def names(*, allow_text: bool = True) -> BeforeValidator:
    """For ``Annotated[tuple[str, ...], names()]``: strings from a YAML list (or, with
    ``allow_text``, ``"a, b"`` / ``"a b"``)."""

    def convert(value: Any) -> tuple[str, ...]:
        if isinstance(value, str) and allow_text:
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, list | tuple):
            raise fail("expected a list of str")
        out = []
        for i, v in enumerate(value):
            if not isinstance(v, str):
                raise fail(f"item {i} = {v!r}: expected str")
            out.append(v)
        return tuple(out)

    return BeforeValidator(convert)


def int_list(*, ge: int | None = None) -> BeforeValidator:
    """For ``Annotated[tuple[int, ...], int_list(...)]``: ints from a YAML list (or
    ``"64, 64"``), each ``>= ge``."""

    def convert(value: Any) -> tuple[int, ...]:
        if isinstance(value, str):
            try:
                value = [int(v) for v in value.replace(",", " ").split() if v]
            except ValueError:
                raise fail("expected a list of int") from None
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise fail("expected a list of int")
        if ge is not None and any(v < ge for v in value):
            raise fail(f"sizes must be >= {ge}", value=list(value))
        return tuple(value)

    return BeforeValidator(convert)


def field_names(model: type[BaseModel]) -> tuple[str, ...]:
    """The model's keys in declaration order (what a YAML file may hold)."""
    return tuple(model.model_fields)


def is_model_type(annotation: Any) -> bool:
    """Whether a field's annotation is a nested settings model (a YAML section)."""
    return get_origin(annotation) is None and isinstance(annotation, type) and issubclass(
        annotation, BaseModel
    )
