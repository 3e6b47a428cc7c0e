"""MIMIC-style EHR cohorts: one row per hospital stay, read from CSV or Parquet.

A site's table has feature columns (named by the experiment's :class:`Schema`), one or more binary
outcome columns (``1`` event, ``0`` no event, empty = label unknown), and optionally a unit/ward
column (e.g. ``first_careunit``) and a stay-id column. :func:`load_ehr_cohort` validates the whole
table *before* any training, splits it into train/test (stratified on the first outcome, seeded),
fits imputation and scaling on the training rows only, and returns a :class:`TabularSite`.

Every problem raises :class:`DataError` naming the file, the column and, for a bad cell, the row
(``row 3 (line 4)``: third data row, fourth line of a CSV with its header on line 1).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from fedmeta.common.config import DataConfig
from fedmeta.common.data.base import TabularSite
from fedmeta.common.data.cache import cache_root, ensure_generated
from fedmeta.common.data.partition import stratified_split
from fedmeta.common.data.registry import DataSpec, Source, register_source
from fedmeta.common.data.schema import (
    Preprocessor,
    Schema,
    encode,
    fit_preprocessor,
    load_schema,
)
from fedmeta.common.data.site_config import EhrSiteConfig, find_site_configs
from fedmeta.common.data.synth_ehr import GENERATOR_VERSION, write_synth_ehr
from fedmeta.common.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
_TRUE = {"1", "1.0", "true", "yes"}
_FALSE = {"0", "0.0", "false", "no"}


def _delimiter(path: Path) -> str:
    """The CSV delimiter: ``;`` or a tab when the header has more of those than commas
    (spreadsheet exports in many locales use ``;``)."""
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig", errors="replace") as f:
        header = f.readline()
    counts = {d: header.count(d) for d in (",", ";", "\t")}
    return max(counts, key=lambda d: counts[d]) if max(counts.values()) > 0 else ","


def read_table(path: str | Path) -> tuple[pd.DataFrame, int | None]:
    """Read a CSV (``.csv``, ``.csv.gz``) or Parquet (``.parquet``, ``.pq``) table.

    Returns the frame and the line offset that turns a 0-based row index into a file line
    (2 for CSV, whose header is line 1; ``None`` for Parquet). CSV cells are read as text so
    that a bad value can be reported as written.
    """
    p = Path(path)
    name = p.name.lower()
    if not p.exists():
        raise DataError(
            f"{p}: data file not found. Hint: check the 'path' in the site YAML "
            "(relative paths are relative to the YAML file)."
        )
    if not p.is_file():
        raise DataError(f"{p}: is not a file")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: data file is empty (0 bytes)")
    try:
        if name.endswith(CSV_SUFFIXES):
            frame = pd.read_csv(
                p, sep=_delimiter(p), dtype=str, keep_default_na=True, skipinitialspace=True
            )
            offset: int | None = 2
        elif name.endswith(PARQUET_SUFFIXES):
            frame = pd.read_parquet(p)
            offset = None
        else:
            raise DataError(
                f"{p}: unsupported table format; use one of {list(CSV_SUFFIXES + PARQUET_SUFFIXES)}"
            )
    except DataError:
        raise
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{p}: data file is empty (no header, no rows)") from e
    except (pd.errors.ParserError, OSError, ValueError) as e:
        raise DataError(f"{p}: cannot read the table: {e}") from e
    if len(frame) == 0:
        raise DataError(f"{p}: data file has a header but no rows (columns {list(frame.columns)})")
    return frame, offset


def parse_outcome(
    column: pd.Series, *, name: str, source: str, line_offset: int | None
) -> np.ndarray:
    """A binary outcome column as int64: 1, 0, or -1 where the label is missing.

    Accepted spellings: ``0``/``1`` (also ``0.0``/``1.0``), ``true``/``false``, ``yes``/``no``
    (any case); an empty cell is a missing label. Anything else raises :class:`DataError`.
    """
    out = np.full(len(column), -1, dtype=np.int64)
    for i, v in enumerate(column.tolist()):
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            continue
        text = str(v).strip().lower()
        if text in ("", "nan"):
            continue
        if text in _TRUE:
            out[i] = 1
        elif text in _FALSE:
            out[i] = 0
        else:
            row = f"row {i + 1}" + (f" (line {i + line_offset})" if line_offset else "")
            raise DataError(
                f"{source}: outcome column {name!r} {row} holds {v!r}; an outcome must be 0 or 1 "
                "(or true/false, yes/no), empty when unknown"
            )
    return out


@dataclass(frozen=True)
class EhrCohort:
    """A loaded site: the :class:`TabularSite` plus what a site reports about itself.

    ``train_rows``/``test_rows``: 0-based data-row positions in the file of each split's rows.
    ``units_train``/``units_test`` hold the unit column's values (strings) when one is configured.
    ``prevalence[outcome]`` is the fraction of labelled rows with the event; ``labelled[outcome]``
    the number of labelled rows; ``missing[feature]`` the fraction of rows where it is missing.
    """

    site: TabularSite
    preprocessor: Preprocessor
    n_rows: int
    prevalence: dict[str, float]
    labelled: dict[str, int]
    missing: dict[str, float]
    train_rows: np.ndarray
    test_rows: np.ndarray
    units_train: np.ndarray | None = None
    units_test: np.ndarray | None = None


def load_ehr_cohort(
    path: str | Path,
    schema: Schema,
    outcomes: Sequence[str],
    *,
    name: str,
    unit_column: str | None = None,
    id_column: str | None = None,
    test_fraction: float = 0.34,
    seed: int = 43,
    missing_indicators: bool = True,
) -> EhrCohort:
    """Read, validate, split and preprocess one site's stay table.

    Checks, in order, each raising :class:`DataError` naming the file: the file exists and has
    rows; every schema feature, outcome, unit and id column is present; ids are unique; every
    numeric cell parses and every categorical cell is a schema category; every outcome is binary
    and has both classes at the site and in its training split. The split is stratified on the
    first outcome (missing labels form their own stratum).
    """
    if not outcomes:
        raise DataError(f"{path}: no outcome columns configured; name at least one")
    if len(set(outcomes)) != len(outcomes):
        raise DataError(f"{path}: outcome columns {list(outcomes)} repeat a name")
    frame, offset = read_table(path)
    source = str(path)
    clash = sorted(set(outcomes) & set(schema.names))
    if clash:
        raise DataError(
            f"{source}: column(s) {clash} are both features and outcomes; an outcome "
            "must not be an input"
        )
    needed = list(outcomes) + [c for c in (unit_column, id_column) if c]
    absent = [c for c in needed if c not in frame.columns]
    if absent:
        raise DataError(
            f"{source}: column(s) {absent} are missing; the file has columns "
            f"{list(frame.columns)}. Hint: check 'outcomes', 'unit_column' and 'id_column' in the "
            "site YAML."
        )
    if id_column:
        dup = frame[id_column].duplicated(keep="first").to_numpy()
        if dup.any():
            i = int(np.flatnonzero(dup)[0])
            row = f"row {i + 1}" + (f" (line {i + offset})" if offset else "")
            raise DataError(
                f"{source}: id column {id_column!r} {row} repeats id "
                f"{frame[id_column].iloc[i]!r}; the table must have one row per stay"
            )
    x = encode(
        frame, schema, source=source, line_offset=offset, missing_indicators=missing_indicators
    )
    y = np.stack(
        [parse_outcome(frame[o], name=o, source=source, line_offset=offset) for o in outcomes],
        axis=1,
    )
    prevalence: dict[str, float] = {}
    labelled: dict[str, int] = {}
    for j, o in enumerate(outcomes):
        lab = y[:, j][y[:, j] >= 0]
        labelled[o] = int(lab.size)
        classes = np.unique(lab)
        if classes.size < 2:
            seen = "no labelled row" if classes.size == 0 else f"only class {int(classes[0])}"
            raise DataError(
                f"{source}: outcome {o!r} has {seen} among {lab.size} labelled rows at site "
                f"{name!r}; a task needs both classes. Hint: drop this outcome for this site."
            )
        prevalence[o] = float(lab.mean())
    train_idx, test_idx = stratified_split(y[:, 0], test_fraction=test_fraction, seed=seed)
    for j, o in enumerate(outcomes):
        lab = y[train_idx, j][y[train_idx, j] >= 0]
        if np.unique(lab).size < 2:
            raise DataError(
                f"{source}: outcome {o!r} has a single class among the {lab.size} labelled "
                f"training rows at site {name!r} (test_fraction {test_fraction}, seed {seed}); "
                "too few events. Hint: lower test_fraction or drop this outcome."
            )
    pre = fit_preprocessor(x[train_idx], schema)
    n_num = len(schema.numeric)
    missing = {f.name: float(np.isnan(x[:, j]).mean()) for j, f in enumerate(schema.numeric)}
    for f in schema.categorical:
        col = frame[f.name]
        blank = col.isna() | col.astype("string").str.strip().eq("").fillna(True)
        missing[f.name] = float(blank.mean())
    log.info(
        "site %s: %d rows (%d train, %d test) from %s; %d numeric, %d categorical features",
        name,
        len(frame),
        train_idx.size,
        test_idx.size,
        source,
        n_num,
        len(schema.categorical),
    )
    site = TabularSite(
        name=name,
        x_train=pre.transform(x[train_idx]),
        y_train=y[train_idx],
        x_test=pre.transform(x[test_idx]),
        y_test=y[test_idx],
        feature_names=schema.encoded_names(missing_indicators=missing_indicators),
        outcomes=tuple(outcomes),
    )
    units_train = units_test = None
    if unit_column:
        units = frame[unit_column].astype("string").fillna("").to_numpy(dtype=object)
        units_train, units_test = units[train_idx], units[test_idx]
    return EhrCohort(
        site,
        pre,
        len(frame),
        prevalence,
        labelled,
        missing,
        train_idx,
        test_idx,
        units_train,
        units_test,
    )


def check_k_shot(site: TabularSite, *, support: int, query: int, source: str = "") -> None:
    """Raise :class:`DataError` unless every outcome has at least ``support + query`` labelled
    training patients, so that a K-support / Q-query task can be drawn without repeats."""
    need = support + query
    where = f"{source}: " if source else ""
    for j, o in enumerate(site.outcomes):
        n = int((site.y_train[:, j] >= 0).sum())
        if n < need:
            raise DataError(
                f"{where}site {site.name!r}, outcome {o!r}: {n} labelled training patients, but a "
                f"task needs support {support} + query {query} = {need}. Hint: lower "
                "tasks.support/tasks.query or test_fraction, or leave this site out."
            )


def split_by_unit(cohort: EhrCohort, *, min_rows: int = 1) -> list[TabularSite]:
    """One :class:`TabularSite` per unit (``"site/unit"``), for per-unit tasks.

    Units with fewer than ``min_rows`` training rows are left out. Preprocessing stays the site's
    (fitted on all its training rows), so units of one site share one encoding.
    """
    if cohort.units_train is None or cohort.units_test is None:
        raise DataError(f"site {cohort.site.name!r} has no unit column configured")
    out = []
    for unit in sorted(set(cohort.units_train.tolist())):
        tr = cohort.units_train == unit
        te = cohort.units_test == unit
        if int(tr.sum()) < min_rows:
            continue
        out.append(
            replace(
                cohort.site,
                name=f"{cohort.site.name}/{unit or '(none)'}",
                x_train=cohort.site.x_train[tr],
                y_train=cohort.site.y_train[tr],
                x_test=cohort.site.x_test[te],
                y_test=cohort.site.y_test[te],
            )
        )
    return out


def load_ehr_site(
    config: EhrSiteConfig, *, test_fraction: float = 0.34, seed: int = 43
) -> EhrCohort:
    """Load the site a ``kind: ehr`` site file describes. ``test_fraction`` and ``seed`` apply
    where the site file does not set its own."""
    schema = load_schema(config.schema)
    return load_ehr_cohort(
        config.path,
        schema,
        config.outcomes,
        name=config.name,
        unit_column=config.unit_column,
        id_column=config.id_column,
        test_fraction=config.test_fraction if config.test_fraction is not None else test_fraction,
        seed=config.seed if config.seed is not None else seed,
        missing_indicators=config.missing_indicators,
    )


# --- data sources "ehr" (a folder of site folders) and "synth-ehr" (generated, cached) ---


def _ehr_configs(root: Path) -> list[EhrSiteConfig]:
    configs = find_site_configs(root)
    wrong = [c for c in configs if not isinstance(c, EhrSiteConfig)]
    if wrong:
        raise ConfigError(
            f"{wrong[0].source}: kind = {wrong[0].kind!r}, but data.source 'ehr' "
            "needs every site to be kind: ehr"
        )
    return [c for c in configs if isinstance(c, EhrSiteConfig)]


def ehr_root(cfg: DataConfig) -> Path:
    if not cfg.path:
        raise ConfigError(
            "data.path is empty: data.source 'ehr' needs the folder holding one "
            "sub-folder per site (each with a site.yaml)"
        )
    return Path(cfg.path).expanduser()


def ehr_spec_from(root: Path) -> DataSpec:
    """The consortium's shape from its site files and schema alone (no patient row is read).
    Every site must use the same schema, outcomes and missing-indicator setting."""
    configs = _ehr_configs(root)
    first = configs[0]
    schema = load_schema(first.schema)
    for c in configs[1:]:
        if load_schema(c.schema) != schema:
            raise ConfigError(
                f"{c.source}: schema {c.schema} differs from {first.schema} "
                f"({first.source}); every site must encode features the same way"
            )
        if c.outcomes != first.outcomes:
            raise ConfigError(
                f"{c.source}: outcomes = {list(c.outcomes)} differ from "
                f"{list(first.outcomes)} ({first.source})"
            )
        if c.missing_indicators != first.missing_indicators:
            raise ConfigError(f"{c.source}: missing_indicators differs from {first.source}")
    width = schema.width(missing_indicators=first.missing_indicators)
    return DataSpec("tabular", (width,), 2, tuple(c.name for c in configs), first.outcomes,
                    features=schema.encoded_names(missing_indicators=first.missing_indicators))


def ehr_spec_from_schema(cfg: DataConfig) -> DataSpec:
    """A deployment's shape from the consortium's schema and outcomes alone (``data.feature_schema``,
    ``data.outcomes``): the coordinator reads no site's files; the sites are those that join."""
    if not cfg.outcomes:
        raise ConfigError(f"data.feature_schema = {cfg.feature_schema!r}: data.outcomes must name "
                          "the outcomes every site labels")
    schema = load_schema(Path(cfg.feature_schema).expanduser())
    names = schema.encoded_names(missing_indicators=cfg.missing_indicators)
    return DataSpec("tabular", (len(names),), 2, (), cfg.outcomes, features=names)


def _ehr_load_from(root: Path, cfg: DataConfig, name: str) -> TabularSite:
    by_name = {c.name: c for c in _ehr_configs(root)}
    return load_ehr_site(by_name[name], test_fraction=cfg.test_fraction, seed=cfg.split_seed).site


def synth_ehr_root(cfg: DataConfig) -> Path:
    """The synthetic consortium's folder, generated on first use: ``data.path`` if set, else
    ``<cache>/synth-ehr-v<version>-<sites>sites-seed<seed>``."""
    target = (
        Path(cfg.path).expanduser()
        if cfg.path
        else cache_root()
        / f"synth-ehr-v{GENERATOR_VERSION}-{cfg.synth_sites}sites-seed{cfg.synth_seed}"
    )
    return ensure_generated(
        target,
        lambda d: write_synth_ehr(d, sites=cfg.synth_sites, seed=cfg.synth_seed),
        expect={"version": GENERATOR_VERSION, "n_sites": cfg.synth_sites, "seed": cfg.synth_seed},
    )


register_source(
    "ehr",
    Source(
        lambda cfg: (ehr_spec_from_schema(cfg) if cfg.feature_schema and not cfg.path
                     else ehr_spec_from(ehr_root(cfg))),
        lambda cfg, name: _ehr_load_from(ehr_root(cfg), cfg, name),
    ),
)
register_source(
    "synth-ehr",
    Source(
        lambda cfg: ehr_spec_from(synth_ehr_root(cfg)),
        lambda cfg, name: _ehr_load_from(synth_ehr_root(cfg), cfg, name),
    ),
)
