"""Real clinical cohorts that install offline, written as a consortium of ``site.yaml`` + CSV.

Each cohort is a public data set shipped inside a Python package, made into one binary outcome at
a horizon and split into hospitals by a natural attribute of the patients, then written exactly
as a real consortium writes its data (a shared ``schema.yaml`` and one folder per site with its
``site.yaml`` and rows), so that fedmeta reads it through ``data.source: ehr`` like any
hospital's table. A survival outcome becomes "event by the horizon": an event at or before it is
1, follow-up past it is 0, and a patient censored before it (outcome unknown) is left out.

- ``actg175`` (``lifelines``: ACTG 175, Hammer et al. 1996; 2,139 HIV-infected adults): an
  AIDS-defining event, a ≥ 50 % CD4 decline or death by 2 years; sites: the four treatment arms;
  baseline covariates only.
- ``gbsg2`` (``scikit-survival``: German Breast Cancer Study Group 2, Schumacher et al. 1994;
  686 women): recurrence or death by 3 years; sites: tumour grade I, II, III.
- ``flchain`` (``scikit-survival``: serum free light chain, Dispenzieri et al. 2012; 7,874
  residents of Olmsted County): death by 5 years; sites: the year the sample was taken, in four
  periods (1995–96, 1997–98, 1999–2000, 2001–03); the cause-of-death column is dropped.

Fed-Heart-Disease needs no writing: it is fedmeta's built-in ``fed-heart`` source.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from fedmeta.common.errors import ConfigError


def _arff(name: str) -> pd.DataFrame:
    import importlib.resources

    from scipy.io import arff

    try:
        root = importlib.resources.files("sksurv.datasets") / "data"
    except ModuleNotFoundError:
        raise ConfigError("this cohort ships in scikit-survival: pip install 'fedmeta[bench]'") from None
    with importlib.resources.as_file(root / f"{name}.arff") as path:
        data, _ = arff.loadarff(str(path))
    df = pd.DataFrame(data)
    for column in df.columns:
        if df[column].dtype == object:
            df[column] = df[column].str.decode("utf-8")
    return df


def _lifelines(name: str) -> pd.DataFrame:
    import importlib.resources

    try:
        root = importlib.resources.files("lifelines.datasets")
    except ModuleNotFoundError:
        raise ConfigError("this cohort ships in lifelines: pip install 'fedmeta[bench]'") from None
    with importlib.resources.as_file(root / name) as path:
        return pd.read_csv(path)


def at_horizon(time: pd.Series, event: pd.Series, horizon: float) -> pd.Series:
    """1 for an event by ``horizon``, 0 for follow-up past it, NaN when censored before it."""
    out = pd.Series(np.nan, index=time.index)
    out[(event == 1) & (time <= horizon)] = 1.0
    out[time > horizon] = 0.0
    return out


@dataclass(frozen=True)
class Cohort:
    name: str
    title: str
    outcome: str
    site_column: str
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    frame: Callable[[], pd.DataFrame]  # one row per patient: features, site, outcome (0/1/NaN)


def _actg175() -> pd.DataFrame:
    df = _lifelines("ACTG175.csv")
    df["outcome"] = at_horizon(df["days"], df["cens"], 730)
    df["site"] = "arm-" + df["arms"].astype(int).astype(str)
    for c in ("hemo", "homo", "drugs", "oprior", "z30", "race", "gender", "symptom", "str2"):
        df[c] = df[c].astype(int).map({0: "no", 1: "yes"})
    return df


def _gbsg2() -> pd.DataFrame:
    df = _arff("GBSG2")
    df["outcome"] = at_horizon(df["time"], df["cens"].astype(int), 3 * 365.25)
    df["site"] = "grade-" + df["tgrade"]
    return df


def _flchain() -> pd.DataFrame:
    df = _arff("flchain")
    df["outcome"] = at_horizon(df["futime"], (df["death"] == "dead").astype(int), 5 * 365.25)
    year = df["sample.yr"].astype(int)
    df["site"] = pd.cut(year, [0, 1996, 1998, 2000, 3000], labels=["1995-96", "1997-98", "1999-2000", "2001-03"]).astype(str)
    df = df.rename(columns={"flc.grp": "flc_grp"})
    return df


COHORTS: dict[str, Cohort] = {
    "actg175": Cohort("actg175", "ACTG 175 (HIV), event by 2 years, sites = treatment arms", "event_2y", "site",
                      ("age", "wtkg", "karnof", "preanti", "cd40", "cd80"),
                      ("hemo", "homo", "drugs", "oprior", "z30", "race", "gender", "symptom", "str2"), _actg175),
    "gbsg2": Cohort("gbsg2", "GBSG2 (breast cancer), recurrence or death by 3 years, sites = tumour grade",
                    "event_3y", "site", ("age", "tsize", "pnodes", "progrec", "estrec"), ("horTh", "menostat"), _gbsg2),
    "flchain": Cohort("flchain", "FLCHAIN (Olmsted County), death by 5 years, sites = sample year",
                      "death_5y", "site", ("age", "kappa", "lambda", "creatinine"), ("sex", "mgus", "flc_grp"), _flchain),
}


def write_cohort(cohort: Cohort, out: Path) -> Path:
    """Write ``cohort`` as a consortium under ``out/<name>``: ``schema.yaml`` and one folder per
    site with ``site.yaml`` and ``rows.csv``; returns the folder (the ``data.path``)."""
    df = cohort.frame()
    df = df[df["outcome"].notna()].copy()
    df[cohort.outcome] = df["outcome"].astype(int)
    root = out / cohort.name
    root.mkdir(parents=True, exist_ok=True)
    features: list[dict[str, object]] = [{"name": c, "type": "numeric"} for c in cohort.numeric]
    features += [{"name": c, "type": "categorical", "categories": sorted(df[c].dropna().astype(str).unique())}
                 for c in cohort.categorical]
    (root / "schema.yaml").write_text(yaml.safe_dump({"features": features}, sort_keys=False))
    for site, rows in sorted(df.groupby(cohort.site_column)):
        folder = root / str(site)
        folder.mkdir(exist_ok=True)
        table = rows[[*cohort.numeric, *cohort.categorical, cohort.outcome]].reset_index(drop=True)
        table.insert(0, "patient_id", np.arange(len(table)))
        table.to_csv(folder / "rows.csv", index=False)
        (folder / "site.yaml").write_text(yaml.safe_dump({
            "kind": "ehr", "name": str(site), "path": "rows.csv", "schema": "../schema.yaml",
            "outcomes": [cohort.outcome], "id_column": "patient_id"}, sort_keys=False))
    return root
