"""Feature schema, encoding and per-site preprocessing for tabular (EHR) cohorts.

The schema (names, types, categories) belongs to the *experiment*: every site encodes its rows
with the same schema, so every site produces the same feature vector layout without sharing any
rows. Preprocessing statistics (medians for imputation, means and standard deviations for the
z-score) are fitted on the site's own training split only, so no test row and no other site's
row influences them.

Encoded layout, for a schema with numeric features ``n_1..n_a`` and categorical features
``c_1..c_b``::

    [n_1 .. n_a | one-hot(c_1) .. one-hot(c_b) | missing(n_1) .. missing(n_a)]

The missing indicators are present only with ``missing_indicators=True``; their number depends on
the schema alone (one per numeric feature), never on the data, so sites agree on the width.
A missing categorical value encodes as all zeros in its one-hot block.

Schema file (YAML)::

    features:
      - {name: age, type: numeric}
      - {name: sex, type: categorical, categories: [F, M]}
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml

from fedmeta.common.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FeatureKind = Literal["numeric", "categorical"]
_KINDS: tuple[str, ...] = ("numeric", "categorical")
MISSING_SUFFIX = "__missing"


@dataclass(frozen=True)
class Feature:
    """One input column: ``kind`` numeric or categorical; ``categories`` for categorical only."""

    name: str
    kind: FeatureKind
    categories: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("schema feature has an empty name")
        if self.kind not in _KINDS:
            raise ConfigError(
                f"schema feature {self.name!r}: type {self.kind!r} is not one of {list(_KINDS)}"
            )
        if self.kind == "categorical":
            if len(self.categories) == 0:
                raise ConfigError(
                    f"schema feature {self.name!r}: a categorical feature needs a non-empty "
                    "'categories' list"
                )
            if len(set(self.categories)) != len(self.categories):
                raise ConfigError(
                    f"schema feature {self.name!r}: categories {list(self.categories)} repeat"
                )
        elif self.categories:
            raise ConfigError(
                f"schema feature {self.name!r}: a numeric feature takes no 'categories' "
                f"(got {list(self.categories)})"
            )


@dataclass(frozen=True)
class Schema:
    """The experiment's feature list, in a fixed order shared by every site."""

    features: tuple[Feature, ...]

    def __post_init__(self) -> None:
        if not self.features:
            raise ConfigError("schema has no features")
        names = [f.name for f in self.features]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"schema lists feature(s) {dup} more than once")

    @property
    def names(self) -> tuple[str, ...]:
        """Raw column names, in schema order."""
        return tuple(f.name for f in self.features)

    @property
    def numeric(self) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.kind == "numeric")

    @property
    def categorical(self) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.kind == "categorical")

    def encoded_names(self, *, missing_indicators: bool) -> tuple[str, ...]:
        """Names of the encoded columns (``sex=F``, ``age__missing``), in encoded order."""
        names = [f.name for f in self.numeric]
        for f in self.categorical:
            names.extend(f"{f.name}={c}" for c in f.categories)
        if missing_indicators:
            names.extend(f"{f.name}{MISSING_SUFFIX}" for f in self.numeric)
        return tuple(names)

    def width(self, *, missing_indicators: bool) -> int:
        """Number of encoded columns."""
        return len(self.encoded_names(missing_indicators=missing_indicators))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, the inverse of :func:`schema_from_dict`."""
        out: list[dict[str, Any]] = []
        for f in self.features:
            d: dict[str, Any] = {"name": f.name, "type": f.kind}
            if f.categories:
                d["categories"] = list(f.categories)
            out.append(d)
        return {"features": out}


def schema_from_dict(data: Any, *, source: str) -> Schema:
    """Build a :class:`Schema` from parsed YAML; ``source`` names the file in error messages."""
    if not isinstance(data, Mapping) or set(data) != {"features"}:
        keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ConfigError(
            f"{source}: a schema is a mapping with exactly one key 'features' (got {keys})"
        )
    items = data["features"]
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{source}: 'features' must be a non-empty list")
    features = []
    for i, item in enumerate(items):
        where = f"{source}: features[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where} must be a mapping with 'name' and 'type', got {item!r}")
        unknown = sorted(set(item) - {"name", "type", "categories"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: name, type, categories")
        if "name" not in item or "type" not in item:
            raise ConfigError(f"{where}: needs both 'name' and 'type' (got {sorted(item)})")
        cats = item.get("categories", [])
        if not isinstance(cats, list):
            raise ConfigError(f"{where}: 'categories' must be a list, got {cats!r}")
        try:
            features.append(Feature(str(item["name"]), item["type"], tuple(str(c) for c in cats)))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
    try:
        return Schema(tuple(features))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e


def load_schema(path: str | Path) -> Schema:
    """Read a schema YAML file (see the module docstring for the format)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"schema file {p} does not exist; check the 'schema' path in the site YAML"
        )
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"schema file {p} is not valid YAML: {e}") from e
    return schema_from_dict(data, source=str(p))


def save_schema(schema: Schema, path: str | Path) -> None:
    """Write ``schema`` as YAML at ``path``."""
    Path(path).write_text(yaml.safe_dump(schema.to_dict(), sort_keys=False))


def _row_label(i: int, line_offset: int | None) -> str:
    """``row 3`` (1-based data row), with the file line when known (CSV: header is line 1)."""
    return f"row {i + 1}" + (f" (line {i + line_offset})" if line_offset is not None else "")


def encode(
    frame: pd.DataFrame,
    schema: Schema,
    *,
    source: str,
    line_offset: int | None = None,
    missing_indicators: bool = False,
) -> np.ndarray:
    """Encode ``frame``'s schema columns to a float64 array; missing numeric values stay NaN.

    Numeric columns are parsed as numbers (a value that is not a number raises
    :class:`DataError` naming ``source``, the column, the row and the value); categorical
    columns are one-hot encoded over the schema's categories (a value outside them raises).
    ``line_offset`` turns a 0-based row index into a file line for messages (CSV: 2).
    Missing indicators (1.0 where the numeric value is missing) are appended when asked.
    """
    missing_cols = [n for n in schema.names if n not in frame.columns]
    if missing_cols:
        raise DataError(
            f"{source}: feature column(s) {missing_cols} are missing; the file has columns "
            f"{list(frame.columns)}. Hint: rename the columns or fix the experiment's schema."
        )
    n = len(frame)
    numeric_blocks: list[np.ndarray] = []
    for f in schema.numeric:
        col = frame[f.name]
        parsed = pd.to_numeric(col, errors="coerce")
        bad = parsed.isna().to_numpy() & col.notna().to_numpy()
        if isinstance(col.dtype, pd.StringDtype) or col.dtype == object:
            blank = col.astype("string").str.strip().eq("").fillna(False).to_numpy(dtype=bool)
            bad &= ~blank
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{source}: column {f.name!r} is numeric in the schema but "
                f"{_row_label(i, line_offset)} holds {col.iloc[i]!r} ({int(bad.sum())} such "
                "value(s)). Hint: leave missing values empty, use '.' as the decimal mark."
            )
        values = parsed.to_numpy(dtype=np.float64)
        if not np.isfinite(values[~np.isnan(values)]).all():
            i = int(np.flatnonzero(np.isinf(values))[0])
            raise DataError(
                f"{source}: column {f.name!r} {_row_label(i, line_offset)} holds an infinite "
                f"value {col.iloc[i]!r}"
            )
        numeric_blocks.append(values[:, None])
    cat_blocks: list[np.ndarray] = []
    for f in schema.categorical:
        col = frame[f.name]
        present = col.notna().to_numpy()
        text = col.astype("string").str.strip()
        present &= ~text.eq("").fillna(True).to_numpy(dtype=bool)
        strings = _category_strings(col)
        index = {c: k for k, c in enumerate(f.categories)}
        block = np.zeros((n, len(f.categories)), dtype=np.float64)
        for row in np.flatnonzero(present).tolist():
            k = index.get(strings[row])
            if k is None:
                raise DataError(
                    f"{source}: column {f.name!r} {_row_label(row, line_offset)} holds "
                    f"{strings[row]!r}, which is not among the schema's categories "
                    f"{list(f.categories)}. Hint: map it to a schema category or extend the schema "
                    "for every site."
                )
            block[row, k] = 1.0
        cat_blocks.append(block)
    blocks = numeric_blocks + cat_blocks
    if missing_indicators:
        blocks += [np.isnan(b).astype(np.float64) for b in numeric_blocks]
    if not blocks:
        return np.zeros((n, 0), dtype=np.float64)
    return np.concatenate(blocks, axis=1)


def _category_strings(col: pd.Series) -> list[str]:
    """Category values as strings; whole floats (``1.0``, as pandas reads an int column with
    gaps) become ``'1'`` so they match integer category codes in the schema."""
    out = []
    for v in col.tolist():
        if isinstance(v, float) and v.is_integer():
            out.append(str(int(v)))
        else:
            out.append(str(v).strip())
    return out


@dataclass(frozen=True)
class Preprocessor:
    """Imputation and scaling statistics of one site's training split.

    For each numeric column ``j``: ``x' = (impute(x) - mean_j) / std_j`` where missing values
    are imputed with ``median_j``, and ``median_j``, ``mean_j``, ``std_j`` (population standard
    deviation, ``ddof=0``) are computed over the *observed* training values. A column with no
    observed training value gets median 0, mean 0, std 1; a constant column gets std 1.
    One-hot and missing-indicator columns pass through unchanged.
    """

    numeric_index: tuple[int, ...]
    median: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Impute and z-score the numeric columns of an encoded array; a new float32 array."""
        out = np.array(x, dtype=np.float64, copy=True)
        idx = list(self.numeric_index)
        if idx:
            block = out[:, idx]
            block = np.where(np.isnan(block), self.median[None, :], block)
            out[:, idx] = (block - self.mean[None, :]) / self.std[None, :]
        return out.astype(np.float32)


def zscore_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and population standard deviation (``ddof=0``) of the observed (non-NaN)
    values of ``x``; a column with no observed value gets mean 0, and a column without spread
    (or without value) std 1, so that ``(x − mean) / std`` is always defined."""
    x = np.asarray(x, dtype=np.float64)
    observed = ~np.isnan(x)
    if observed.all():
        mean, std = x.mean(axis=0), x.std(axis=0)
    else:
        mean, std = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        for j in range(x.shape[1]):
            column = x[observed[:, j], j]
            if column.size:
                mean[j], std[j] = float(column.mean()), float(column.std())
    return mean, np.where(std > 0, std, 1.0)


def fit_preprocessor(x_train: np.ndarray, schema: Schema) -> Preprocessor:
    """Fit :class:`Preprocessor` statistics on encoded *training* rows only."""
    k = len(schema.numeric)
    idx = tuple(range(k))
    median = np.zeros(k)
    for j in idx:
        observed = x_train[:, j][~np.isnan(x_train[:, j])]
        if observed.size == 0:
            log.warning(
                "numeric feature %r has no observed training value: imputed as 0",
                schema.numeric[j].name,
            )
            continue
        median[j] = float(np.median(observed))
    mean, std = zscore_fit(x_train[:, list(idx)]) if k else (np.zeros(0), np.ones(0))
    return Preprocessor(idx, median, mean, std)


def infer_schema(
    frame: pd.DataFrame, columns: Sequence[str], *, max_categories: int = 20
) -> Schema:
    """A starting schema from one table: numeric where every present value parses as a number,
    otherwise categorical with the sorted distinct values. A convenience for writing the
    experiment's schema file; the experiment must then share that file with every site."""
    features = []
    for name in columns:
        col = frame[name]
        present = col.dropna()
        parsed = pd.to_numeric(present, errors="coerce")
        if len(present) and parsed.notna().all():
            features.append(Feature(name, "numeric"))
        else:
            cats = sorted(set(_category_strings(present)))
            if len(cats) > max_categories:
                raise DataError(
                    f"column {name!r} has {len(cats)} distinct non-numeric values "
                    f"(> {max_categories}); list its categories in the schema by hand"
                )
            features.append(Feature(name, "categorical", tuple(cats)))
    return Schema(tuple(features))
