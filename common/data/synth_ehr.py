"""Seeded synthetic MIMIC-style hospitals that share physiology but differ in everything else.

Every patient has latent states (age, overall severity ``s``, renal ``r``, infection ``i``, cardiac
``c`` and a frailty term ``u``); vitals and labs are noisy functions of them, the same functions at
every hospital. Hospitals differ in:

- **case-mix**: mean age, mean severity, admission types and care-unit mix;
- **outcome prevalence**: a per-hospital intercept on each outcome's logit, and slightly
  perturbed outcome coefficients (the same outcome depends a little differently on the state);
- **measurement shift**: per-hospital calibration of each lab and vital (``x_obs = a_j x + b_j``);
- **missingness**: a per-hospital rate, higher for labs than vitals, and lactate drawn more
  often in sicker patients (missing not at random).

Four correlated binary outcomes share the latent states and the frailty term ``u``:
``mortality`` (in-hospital death), ``los_gt_7d`` (length of stay over 7 days),
``readmission_30d`` (unknown, left empty, for patients who died) and ``aki`` (acute kidney injury).

:func:`write_synth_ehr` writes the layout a real consortium uses, so simulation runs the real
readers::

    OUT/schema.yaml                    the experiment's feature schema
    OUT/hospital-01/site.yaml          the site's data configuration (kind: ehr)
    OUT/hospital-01/stays.csv          one row per ICU stay
    OUT/generator.json                 seed and each hospital's drawn parameters (for reports)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from fedmeta.common.data.schema import Feature, Schema, save_schema
from fedmeta.common.errors import DataError

log = logging.getLogger(__name__)

# Bumped whenever the same arguments would produce different data (names cached folders).
GENERATOR_VERSION = 1

OUTCOMES: tuple[str, ...] = ("mortality", "los_gt_7d", "readmission_30d", "aki")
UNITS: tuple[str, ...] = ("MICU", "SICU", "CCU", "CSRU", "TSICU")
ADMISSION_TYPES: tuple[str, ...] = ("emergency", "urgent", "elective")
# name -> (typical value, spread used to scale the measurement shift, is a lab)
NUMERIC: dict[str, tuple[float, float, bool]] = {
    "age": (65.0, 15.0, False),
    "heart_rate": (88.0, 15.0, False),
    "sys_bp": (118.0, 18.0, False),
    "resp_rate": (19.0, 4.0, False),
    "temperature": (37.0, 0.6, False),
    "spo2": (96.0, 2.5, False),
    "gcs": (13.0, 3.0, False),
    "wbc": (9.5, 4.0, True),
    "creatinine": (1.2, 0.8, True),
    "bun": (20.0, 10.0, True),
    "lactate": (1.8, 1.0, True),
    "sodium": (139.0, 4.0, True),
    "potassium": (4.2, 0.5, True),
    "glucose": (135.0, 40.0, True),
    "hemoglobin": (11.0, 2.0, True),
    "platelets": (220.0, 80.0, True),
}
# Outcome logit = intercept + coefficients . [s, r, i, c, age/10 - 6.5, emergency, surgical, u]
_COEF: dict[str, tuple[float, ...]] = {
    "mortality": (1.1, 0.4, 0.3, 0.2, 0.35, 0.4, -0.2, 0.8),
    "los_gt_7d": (0.8, 0.2, 0.6, 0.1, 0.05, 0.2, 0.6, 0.6),
    "readmission_30d": (0.4, 0.3, 0.1, 0.5, 0.2, 0.3, 0.0, 0.7),
    "aki": (0.4, 1.4, 0.2, 0.3, 0.15, 0.1, 0.3, 0.4),
}
_INTERCEPT = {"mortality": -3.3, "los_gt_7d": -1.1, "readmission_30d": -2.0, "aki": -1.9}


def ehr_schema() -> Schema:
    """The generator's feature schema: 16 numeric features and 3 categorical ones."""
    feats = [Feature(n, "numeric") for n in NUMERIC]
    feats.append(Feature("sex", "categorical", ("F", "M")))
    feats.append(Feature("admission_type", "categorical", ADMISSION_TYPES))
    feats.append(Feature("first_careunit", "categorical", UNITS))
    return Schema(tuple(feats))


@dataclass(frozen=True)
class HospitalParams:
    """One hospital's drawn differences (recorded in ``generator.json``)."""

    name: str
    n_stays: int
    age_mean: float
    severity_mean: float
    unit_mix: tuple[float, ...]
    emergency_share: float
    outcome_offset: dict[str, float]
    lab_scale: dict[str, float]
    lab_bias: dict[str, float]
    missing_rate: float


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def draw_hospitals(
    n_sites: int, *, seed: int, mean_stays: int = 400, shift: float = 1.0
) -> list[HospitalParams]:
    """Draw ``n_sites`` hospitals' parameters. ``shift`` scales every between-site difference
    (0: identical hospitals apart from size)."""
    if n_sites < 1:
        raise DataError(f"synth-ehr: sites = {n_sites}: must be >= 1")
    if mean_stays < 40:
        raise DataError(f"synth-ehr: mean_stays = {mean_stays}: must be >= 40")
    if shift < 0:
        raise DataError(f"synth-ehr: shift = {shift}: must be >= 0")
    rng = np.random.default_rng([seed, 0])
    out = []
    for k in range(n_sites):
        n = int(np.clip(np.round(mean_stays * np.exp(rng.normal(0, 0.45))), 60, 8 * mean_stays))
        mix = rng.dirichlet(np.full(len(UNITS), 2.0 / max(shift, 1e-3) if shift > 0 else 1e6))
        out.append(
            HospitalParams(
                name=f"hospital-{k + 1:02d}",
                n_stays=n,
                age_mean=float(65 + shift * rng.normal(0, 6)),
                severity_mean=float(shift * rng.normal(0, 0.4)),
                unit_mix=tuple(float(m) for m in mix),
                emergency_share=float(np.clip(0.7 + shift * rng.normal(0, 0.12), 0.2, 0.95)),
                outcome_offset={o: float(shift * rng.normal(0, 0.4)) for o in OUTCOMES},
                lab_scale={
                    f: float(np.exp(shift * rng.normal(0, 0.05))) for f in NUMERIC if f != "age"
                },
                lab_bias={
                    f: float(shift * rng.normal(0, 0.15) * NUMERIC[f][1])
                    for f in NUMERIC
                    if f != "age"
                },
                missing_rate=float(np.clip(0.08 + shift * rng.normal(0, 0.06), 0.01, 0.35)),
            )
        )
    return out


def simulate_stays(params: HospitalParams, *, seed: int, site_index: int) -> pd.DataFrame:
    """One hospital's stay table (as a hospital would export it) for drawn ``params``."""
    rng = np.random.default_rng([seed, 1, site_index])
    n = params.n_stays
    age = np.clip(rng.normal(params.age_mean, 15, n), 18, 95)
    a = age / 10 - 6.5
    s = rng.normal(params.severity_mean, 1.0, n) + 0.2 * a
    r = 0.5 * s + 0.15 * a + rng.normal(0, 0.85, n)
    i = 0.4 * s + rng.normal(0, 0.9, n)
    unit_idx = rng.choice(len(UNITS), size=n, p=np.asarray(params.unit_mix))
    cardiac_unit = np.isin(unit_idx, [UNITS.index("CCU"), UNITS.index("CSRU")])
    c = 0.3 * s + 0.2 * a + 0.8 * cardiac_unit + rng.normal(0, 0.85, n)
    u = rng.normal(0, 1.0, n)
    surgical = np.isin(unit_idx, [UNITS.index("SICU"), UNITS.index("CSRU"), UNITS.index("TSICU")])
    p_emerg = _sigmoid(np.log(params.emergency_share / (1 - params.emergency_share)) + 0.5 * s)
    emerg = rng.random(n) < p_emerg
    adm = np.where(emerg, 0, np.where(rng.random(n) < 0.4, 1, 2))
    sex = np.where(rng.random(n) < 0.56, "M", "F")

    def noise(sd: float) -> np.ndarray:
        return rng.normal(0, sd, n)

    true = {
        "age": age,
        "heart_rate": 88 + 8 * s + 6 * i + 3 * c + noise(8),
        "sys_bp": 118 - 8 * s - 6 * c + 2 * a + noise(12),
        "resp_rate": 19 + 2.5 * s + 1.5 * i + noise(2.5),
        "temperature": 37.0 + 0.45 * i + noise(0.35),
        "spo2": np.minimum(100, 96.5 - 1.3 * s + noise(1.4)),
        "gcs": np.clip(np.round(14 - 1.8 * s + noise(1.2)), 3, 15),
        "wbc": np.exp(np.log(9.0) + 0.25 * i + noise(0.2)),
        "creatinine": np.exp(np.log(1.0) + 0.35 * r + noise(0.18)),
        "bun": np.exp(np.log(18) + 0.3 * r + 0.1 * s + noise(0.25)),
        "lactate": np.exp(np.log(1.5) + 0.3 * s + 0.1 * i + noise(0.25)),
        "sodium": 139 - 0.6 * s + noise(3),
        "potassium": 4.2 + 0.2 * r + noise(0.4),
        "glucose": np.exp(np.log(130) + 0.1 * s + noise(0.25)),
        "hemoglobin": 11.2 - 0.5 * s + noise(1.4),
        "platelets": np.exp(np.log(220) - 0.15 * s + noise(0.3)),
    }
    state = np.stack([s, r, i, c, a, emerg.astype(float), surgical.astype(float), u], axis=1)
    labels: dict[str, np.ndarray] = {}
    for o in OUTCOMES:
        coef = np.asarray(_COEF[o]) * np.exp(rng.normal(0, 0.12, len(_COEF[o])))
        logit = _INTERCEPT[o] + params.outcome_offset[o] + state @ coef
        labels[o] = (rng.random(n) < _sigmoid(logit)).astype(np.int64)

    frame = pd.DataFrame({"stay_id": np.arange(1, n + 1) + 100000 * (site_index + 1)})
    for f, values in true.items():
        if f in ("age", "gcs"):  # recorded, not measured by an instrument: no calibration shift
            obs = values
        else:
            obs = params.lab_scale[f] * values + params.lab_bias[f]
        obs = np.round(obs, 0 if f in ("age", "gcs", "heart_rate", "sys_bp", "resp_rate") else 2)
        is_lab = NUMERIC[f][2]
        base = params.missing_rate * (1.0 if is_lab else 0.15)
        logit_m = np.log(max(base, 1e-4) / (1 - base)) + (-0.8 * s if f == "lactate" else 0.0)
        if f == "lactate":
            logit_m = logit_m + 1.5  # lactate is not drawn routinely
        miss = rng.random(n) < _sigmoid(logit_m) if f != "age" else np.zeros(n, dtype=bool)
        col = pd.Series(obs).astype(object)
        col[miss] = None
        frame[f] = col
    frame["sex"] = sex
    frame["admission_type"] = np.asarray(ADMISSION_TYPES)[adm]
    frame["first_careunit"] = np.asarray(UNITS)[unit_idx]
    for o in OUTCOMES:
        col = pd.Series(labels[o]).astype(object)
        if o == "readmission_30d":
            col[labels["mortality"] == 1] = None  # not defined for patients who died
        frame[o] = col
    return frame


def write_synth_ehr(
    out_dir: str | Path,
    *,
    sites: int,
    seed: int = 0,
    mean_stays: int = 400,
    shift: float = 1.0,
    outcomes: Sequence[str] = OUTCOMES,
    file_format: str = "csv",
) -> list[Path]:
    """Generate ``sites`` hospitals into ``out_dir`` (see the module docstring for the layout)
    and return the site YAML paths, in site order. Same arguments, same bytes."""
    unknown = [o for o in outcomes if o not in OUTCOMES]
    if unknown or not outcomes:
        raise DataError(f"synth-ehr: outcomes {list(outcomes)}: choose from {list(OUTCOMES)}")
    if file_format not in ("csv", "parquet"):
        raise DataError(f"synth-ehr: format {file_format!r}: use csv or parquet")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_schema(ehr_schema(), out / "schema.yaml")
    params = draw_hospitals(sites, seed=seed, mean_stays=mean_stays, shift=shift)
    paths = []
    summary = []
    for k, p in enumerate(params):
        frame = simulate_stays(p, seed=seed, site_index=k)
        frame = frame[["stay_id", *ehr_schema().names, *outcomes]]
        site_dir = out / p.name
        site_dir.mkdir(exist_ok=True)
        data_name = f"stays.{file_format}"
        if file_format == "csv":
            frame.to_csv(site_dir / data_name, index=False)
        else:
            frame.to_parquet(site_dir / data_name, index=False)
        site_yaml = {
            "kind": "ehr",
            "name": p.name,
            "path": data_name,
            "schema": "../schema.yaml",
            "outcomes": list(outcomes),
            "unit_column": "first_careunit",
            "id_column": "stay_id",
        }
        (site_dir / "site.yaml").write_text(yaml.safe_dump(site_yaml, sort_keys=False))
        paths.append(site_dir / "site.yaml")
        prevalence = {o: float(pd.to_numeric(frame[o]).mean()) for o in outcomes}
        summary.append({**asdict(p), "prevalence": prevalence})
        log.info(
            "synth-ehr: %s: %d stays, prevalence %s",
            p.name,
            p.n_stays,
            {o: round(v, 3) for o, v in prevalence.items()},
        )
    (out / "generator.json").write_text(
        json.dumps(
            {
                "generator": "fedmeta synth-ehr",
                "version": GENERATOR_VERSION,
                "n_sites": sites,
                "seed": seed,
                "mean_stays": mean_stays,
                "shift": shift,
                "hospitals": summary,
            },
            indent=1,
        )
    )
    return paths
