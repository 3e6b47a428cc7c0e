"""A site's fitted preprocessing as plain data: what a bundle needs to score new patients.

Three kinds, each turning the table (or images) a hospital has into the network's float32 input
and refusing, with :class:`~fedmeta.common.errors.DataError`, anything that differs from what the
model was fitted on — naming exactly what differs:

- :class:`EhrPreprocessing`: the experiment's :class:`~fedmeta.common.data.schema.Schema`
  (feature names, order, categories), missing indicators, and the site's imputation medians,
  means and standard deviations. It reuses :func:`~fedmeta.common.data.schema.encode` and
  :class:`~fedmeta.common.data.schema.Preprocessor`, so it transforms exactly as training did.
- :class:`HeartPreprocessing`: Fed-Heart-Disease's encoding of the raw UCI columns (FLamby's; see
  :mod:`fedmeta.common.data.heart`) and the hospital's z-score. ``heart._encode`` is private and
  needs the label column, so this is a twin of it, tested to transform identically.
- :class:`ImagePreprocessing`: channels, image size and value range of the training images.

Each has ``to_dict``/``from_dict`` (JSON: floats round-trip exactly) for the bundle.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from fedmeta.common.data import heart
from fedmeta.common.data.base import ImageSite, TabularSite
from fedmeta.common.data.schema import (
    Preprocessor,
    Schema,
    _category_strings,
    encode,
    load_schema,
    schema_from_dict,
)
from fedmeta.common.errors import DataError

if TYPE_CHECKING:
    from fedmeta.common.data.ehr import EhrCohort
    from fedmeta.common.data.site_config import EhrSiteConfig

log = logging.getLogger(__name__)


def _shown(names: Sequence[str], limit: int = 20) -> str:
    items = [repr(n) for n in names[:limit]]
    return ", ".join(items) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_columns(frame: pd.DataFrame, expected: Sequence[str], *, source: str,
                  id_column: str | None = None, what: str = "the model") -> list[str]:
    """Missing columns raise :class:`DataError` naming them; extra columns are ignored and
    reported in the returned notes (a different column order is fine)."""
    cols = [str(c) for c in frame.columns]
    dup = sorted({c for c in cols if cols.count(c) > 1})
    if dup:
        raise DataError(f"{source}: column(s) {_shown(dup)} appear more than once")
    needed = list(expected) + ([id_column] if id_column else [])
    missing = [c for c in needed if c not in cols]
    if missing:
        close = {m: [c for c in cols if c.strip().lower() == m.lower()] for m in missing}
        hints = "; ".join(f"{m!r} looks like {v[0]!r}" for m, v in close.items() if v)
        raise DataError(
            f"{source}: column(s) {_shown(missing)} that {what} needs are missing"
            + (f" ({hints})" if hints else "")
            + f". The table has {_shown(cols)}; {what} expects {_shown(needed)}."
        )
    extra = [c for c in cols if c not in needed]
    return [f"{source}: ignored {len(extra)} column(s) the model does not use: {_shown(extra)}"] if extra else []


@dataclass(frozen=True)
class EhrPreprocessing:
    """Schema encoding, median imputation and z-scores fitted on one site's training rows."""

    kind: ClassVar[str] = "ehr"
    schema: Schema
    missing_indicators: bool
    median: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_preprocessor(cls, schema: Schema, pre: Preprocessor, *, missing_indicators: bool
                          ) -> EhrPreprocessing:
        """From the :class:`Preprocessor` that :func:`~fedmeta.common.data.ehr.load_ehr_cohort`
        fitted (``EhrCohort.preprocessor``)."""
        if tuple(pre.numeric_index) != tuple(range(len(schema.numeric))):
            raise ValueError("the preprocessor's numeric columns do not match the schema's")
        return cls(schema, missing_indicators, tuple(map(float, pre.median)),
                   tuple(map(float, pre.mean)), tuple(map(float, pre.std)))

    @classmethod
    def from_site_config(cls, config: EhrSiteConfig, cohort: EhrCohort) -> EhrPreprocessing:
        """From a site file and the cohort :func:`~fedmeta.common.data.ehr.load_ehr_site` loaded
        from it; checks that the encoding gives the cohort's feature names."""
        pre = cls.from_preprocessor(load_schema(config.schema), cohort.preprocessor,
                                    missing_indicators=config.missing_indicators)
        if pre.feature_names != cohort.site.feature_names:
            raise ValueError(f"{config.source}: the schema's encoding does not give the cohort's features")
        return pre

    @property
    def columns(self) -> tuple[str, ...]:
        return self.schema.names

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.schema.encoded_names(missing_indicators=self.missing_indicators)

    @property
    def preprocessor(self) -> Preprocessor:
        k = len(self.schema.numeric)
        return Preprocessor(tuple(range(k)), np.array(self.median), np.array(self.mean), np.array(self.std))

    def check(self, frame: pd.DataFrame, *, source: str, id_column: str | None = None) -> list[str]:
        """Every difference between ``frame`` and the schema that can be named before encoding:
        missing columns, and every categorical value outside the schema's categories."""
        notes = check_columns(frame, self.columns, source=source, id_column=id_column)
        unseen: list[str] = []
        for f in self.schema.categorical:
            col = frame[f.name]
            present = col.notna().to_numpy() & ~col.astype("string").str.strip().eq("").fillna(True).to_numpy(dtype=bool)
            values = [v for v, ok in zip(_category_strings(col), present, strict=True) if ok]
            bad = sorted(set(values) - set(f.categories))
            if bad:
                unseen.append(f"column {f.name!r} holds {_shown(bad)}, not among the categories "
                              f"{list(f.categories)} the model was fitted with")
        if unseen:
            raise DataError(f"{source}: " + "; ".join(unseen) + ". Hint: recode these values "
                            "to the model's categories (a different coding or unit?)")
        return notes

    def transform(self, frame: pd.DataFrame, *, source: str = "table") -> np.ndarray:
        """The network input: ``encode`` with the schema, then impute and scale (float32)."""
        self.check(frame, source=source)
        x = encode(frame, self.schema, source=source, missing_indicators=self.missing_indicators)
        return self.preprocessor.transform(x)

    def describe(self) -> str:
        return (f"{len(self.schema.numeric)} numeric and {len(self.schema.categorical)} categorical "
                f"columns; median imputation{' with missing indicators' if self.missing_indicators else ''}, "
                "z-scores fitted on the site's training rows")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "schema": self.schema.to_dict(),
                "missing_indicators": self.missing_indicators, "median": list(self.median),
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EhrPreprocessing:
        schema = schema_from_dict(d["schema"], source="bundle")
        k = len(schema.numeric)
        stats = [tuple(float(v) for v in d[key]) for key in ("median", "mean", "std")]
        if any(len(s) != k for s in stats):
            raise ValueError(f"bundle preprocessing: {k} numeric features but statistics of "
                             f"lengths {[len(s) for s in stats]}")
        return cls(schema, bool(d["missing_indicators"]), *stats)


_TRUE, _FALSE = {"TRUE", "1", "1.0", "YES"}, {"FALSE", "0", "0.0", "NO"}


@dataclass(frozen=True)
class HeartPreprocessing:
    """Fed-Heart-Disease: FLamby's encoding of the raw UCI columns and the hospital's z-score.

    ``x = (encode(row) − mean) / std`` over the 13 encoded features of
    :data:`fedmeta.common.data.heart.FEATURES` (a zero training std counts as 1). Every value must
    be present: the model has no imputation (FLamby drops incomplete rows).
    """

    kind: ClassVar[str] = "fed-heart"
    COLUMNS: ClassVar[tuple[str, ...]] = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
                                          "thalch", "exang", "oldpeak")
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        return self.COLUMNS

    @property
    def feature_names(self) -> tuple[str, ...]:
        return heart.FEATURES

    @staticmethod
    def encode(frame: pd.DataFrame, *, source: str = "table") -> np.ndarray:
        """The 13 unscaled features (float64), as ``heart._encode`` computes them."""
        check_columns(frame, HeartPreprocessing.COLUMNS, source=source)
        empty = [c for c in HeartPreprocessing.COLUMNS
                 if frame[c].isna().any() or frame[c].astype("string").str.strip().eq("").any()]
        if empty:
            rows = sorted({int(i) + 1 for c in empty for i in np.flatnonzero(
                (frame[c].isna() | frame[c].astype("string").str.strip().eq("")).to_numpy())})
            raise DataError(f"{source}: column(s) {_shown(empty)} are empty in row(s) {rows[:10]}; "
                            "the Fed-Heart-Disease model has no imputation (FLamby drops incomplete rows)")
        out: dict[str, np.ndarray] = {}
        for col in ("age", "trestbps", "chol", "thalch", "oldpeak"):
            parsed = pd.to_numeric(frame[col], errors="coerce")
            if parsed.isna().any():
                i = int(np.flatnonzero(parsed.isna().to_numpy())[0])
                raise DataError(f"{source}: column {col!r} row {i + 1} holds {frame[col].iloc[i]!r}, "
                                "not a number")
            out[col] = parsed.to_numpy(dtype=np.float64)
        out["sex"] = _levels(frame, "sex", {"Male": 1.0, "Female": 0.0}, source)
        for col in ("fbs", "exang"):
            text = frame[col].astype("string").str.strip().str.upper()
            bad = sorted(set(text) - _TRUE - _FALSE)
            if bad:
                raise DataError(f"{source}: column {col!r} holds {_shown(bad)}; the model expects "
                                "TRUE/FALSE")
            out[col] = text.isin(_TRUE).to_numpy(dtype=np.float64)
        for col, levels in (("cp", heart.CP_LEVELS), ("restecg", heart.RESTECG_LEVELS)):
            codes = _levels(frame, col, {lvl: float(i) for i, lvl in enumerate(levels)}, source)
            for i, lvl in enumerate(levels[1:], start=1):
                out[f"{col}={lvl}"] = (codes == i).astype(np.float64)
        return np.stack([out[f] for f in heart.FEATURES], axis=1)

    @classmethod
    def for_site(cls, site: TabularSite, *, path: str | Path | None = None) -> HeartPreprocessing:
        """Refit on the raw training rows of a hospital loaded by
        :func:`~fedmeta.common.data.heart.load_hospital` (found by ``site.row_ids_train``)."""
        frame = heart.load_frame(path)
        rows = frame[frame["dataset"] == site.name].set_index("id", drop=False)
        missing = sorted(set(site.row_ids_train) - set(rows.index))
        if missing:
            raise DataError(f"{path or heart.default_csv()}: training rows {missing[:5]} of "
                            f"{site.name} are not in the table")
        return cls.fit(rows.loc[list(site.row_ids_train)], source=f"{site.name} training rows")

    @classmethod
    def fit(cls, train: pd.DataFrame, *, source: str = "training rows") -> HeartPreprocessing:
        """Training mean and population standard deviation of the encoded features."""
        x = cls.encode(train, source=source)
        std = x.std(axis=0)
        return cls(tuple(map(float, x.mean(axis=0))), tuple(float(s) if s > 0 else 1.0 for s in std))

    def check(self, frame: pd.DataFrame, *, source: str, id_column: str | None = None) -> list[str]:
        return check_columns(frame, self.COLUMNS, source=source, id_column=id_column)

    def transform(self, frame: pd.DataFrame, *, source: str = "table") -> np.ndarray:
        x = self.encode(frame, source=source)
        return ((x - np.array(self.mean)) / np.array(self.std)).astype(np.float32)

    def describe(self) -> str:
        return "FLamby's Fed-Heart-Disease encoding (13 features), z-scores of the site's training rows"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HeartPreprocessing:
        mean, std = tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"])
        if len(mean) != len(heart.FEATURES) or len(std) != len(heart.FEATURES):
            raise ValueError(f"bundle preprocessing: Fed-Heart-Disease needs {len(heart.FEATURES)} "
                             f"means and stds, got {len(mean)} and {len(std)}")
        return cls(mean, std)


def _levels(frame: pd.DataFrame, col: str, mapping: Mapping[str, float], source: str) -> np.ndarray:
    text = frame[col].astype("string").str.strip()
    bad = sorted(set(text) - set(mapping))
    if bad:
        raise DataError(f"{source}: column {col!r} holds {_shown(bad)}, not among the levels "
                        f"{list(mapping)} the model was fitted with (a different coding?)")
    return text.map(dict(mapping)).to_numpy(dtype=np.float64)


@dataclass(frozen=True)
class ImagePreprocessing:
    """Images as the model saw them: ``channels × height × width``, values in [0, 1] (uint8
    inputs are divided by 255), then ``(x − mean_c) / std_c`` per channel when given."""

    kind: ClassVar[str] = "images"
    channels: int
    height: int
    width: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if min(self.channels, self.height, self.width) < 1:
            raise ValueError("image channels, height and width must be >= 1")
        if len(self.mean) != len(self.std) or (self.mean and len(self.mean) != self.channels):
            raise ValueError(f"per-channel mean/std need {self.channels} values each")

    @classmethod
    def for_site(cls, site: ImageSite) -> ImagePreprocessing:
        """Channels and size of a site's training images (values already in [0, 1])."""
        _, c, h, w = site.x_train.shape
        return cls(int(c), int(h), int(w))

    @property
    def columns(self) -> tuple[str, ...]:
        return ()

    def describe(self) -> str:
        return f"{self.channels}x{self.height}x{self.width} images, values in [0, 1]"

    def transform(self, images: np.ndarray, *, source: str = "images") -> np.ndarray:
        from fedmeta.common.data.images import to_nchw

        arr = np.asarray(images)
        if arr.ndim == 4 and arr.shape[1] == self.channels and arr.shape[2:] == (self.height, self.width):
            x = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
            if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
                raise DataError(f"{source}: image values must be uint8 0-255 or floats in [0, 1]")
        else:
            x = to_nchw(arr, source=source, key="images")
        if x.shape[1:] != (self.channels, self.height, self.width):
            c, h, w = x.shape[1:]
            raise DataError(
                f"{source}: images are {h}x{w} with {c} channel(s); this model was fitted on "
                f"{self.height}x{self.width} with {self.channels} channel(s). Hint: resize "
                "(and convert to grey or RGB) as the training images were")
        if self.mean:
            x = (x - np.array(self.mean, dtype=np.float32)[None, :, None, None]) / np.array(
                self.std, dtype=np.float32)[None, :, None, None]
        return x.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "channels": self.channels, "height": self.height,
                "width": self.width, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImagePreprocessing:
        return cls(int(d["channels"]), int(d["height"]), int(d["width"]),
                   tuple(float(v) for v in d.get("mean", ())), tuple(float(v) for v in d.get("std", ())))


Preprocessing = EhrPreprocessing | HeartPreprocessing | ImagePreprocessing
_KINDS: dict[str, Any] = {c.kind: c for c in (EhrPreprocessing, HeartPreprocessing, ImagePreprocessing)}


def preprocessing_from_dict(d: Mapping[str, Any]) -> Preprocessing:
    """Rebuild a preprocessing from its ``to_dict`` form; ``ValueError`` for an unknown kind."""
    kind = d.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown preprocessing kind {kind!r}; known: {sorted(_KINDS)}")
    out: Preprocessing = _KINDS[kind].from_dict(d)
    return out
