"""The synthetic EHR consortium written as MEDS event streams, from exactly the same stays.

:func:`write_synth_meds` first writes the flat consortium with
:func:`fedmeta.common.data.synth_ehr.write_synth_ehr` (same seed, same stays, kept in ``OUT/flat``
for side-by-side runs) and then re-expresses every stay as the events a hospital's MEDS export
would hold, one subject per stay::

    OUT/flat/...                          the synth-ehr consortium (Parquet tables)
    OUT/hospital-01/site.yaml             kind: meds
    OUT/hospital-01/meds/data/0.parquet   event shards of whole subjects
    OUT/hospital-01/meds/metadata/{dataset.json,codes.parquet[,subject_splits.parquet]}
    OUT/hospital-01/labels/<outcome>.parquet   one MEDS label file per outcome
    OUT/generator.json                    seed, settings and each hospital's coding

Each stay is admitted at ``t0`` (a minute in 2150-2152, MIMIC-style shifted dates) and predicted at
``p = t0 + 48 h``. Its events:

- **static**: ``GENDER//F|M`` (null time); ``MEDS_BIRTH`` at ``p - age`` (the table's age is the
  age at the prediction time);
- **admission**: ``ADMISSION//<TYPE>`` and ``ICU_ADMISSION//<UNIT>`` at ``t0``;
- **history**: ICD-10 diagnoses of earlier visits (diabetes, chronic kidney disease, heart
  failure, COPD, hypertension), drawn from the stay's observed values, 30-1500 days before ``t0``;
- **vitals and labs** (LOINC codes) over ``[t0, p)``: vitals every ``vitals_every_min`` minutes,
  GCS every 4 h, labs every 6 h, lactate every 12 h, each measurement missing at random; the
  **last** measurement before ``p`` equals the table's value exactly, and a value missing from
  the table has no event at all;
- **after the prediction time** (what the tabulariser must ignore): discharge (after more than
  7 days iff ``los_gt_7d``), ``MEDS_DEATH`` at discharge iff ``mortality``, discharge diagnoses
  (``N17.9`` acute kidney injury for most ``aki`` stays, sepsis), a readmission within 30 days iff
  ``readmission_30d``.

Hospitals code some labs differently, as real ones do: with probability ``recode_rate`` a site
reports glucose, lactate or potassium in whole blood (LOINC 2339-0, 32693-4, 6298-4) instead of
serum/plasma. The label files carry the table's outcomes (no row where the table has none).
So ``all/<code>/last``, ``present`` and the age tabularise to the table's features exactly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import yaml

from fedmeta.common.data.meds.config import DEFAULT_WINDOWS
from fedmeta.common.data.meds.schema import (
    BIRTH_CODE,
    DEATH_CODE,
    HELD_OUT_SPLIT,
    TRAIN_SPLIT,
    TUNING_SPLIT,
)
from fedmeta.common.data.meds.writer import GENERATOR_VERSION, write_labels, write_meds_dataset
from fedmeta.common.data.synth_ehr import NUMERIC, OUTCOMES, write_synth_ehr
from fedmeta.common.errors import DataError

log = logging.getLogger(__name__)

PREDICTION_US = 48 * 3_600_000_000
_MIN_US = 60_000_000
_DAY_US = 86_400_000_000
_YEAR_US = 365.25 * _DAY_US
_T_BASE = int(np.datetime64("2150-01-01T00:00", "us").astype(np.int64))

#: Flat-table feature -> LOINC code (serum/plasma for labs).
CODES: dict[str, str] = {
    "heart_rate": "LOINC//8867-4",
    "sys_bp": "LOINC//8480-6",
    "resp_rate": "LOINC//9279-1",
    "temperature": "LOINC//8310-5",
    "spo2": "LOINC//59408-5",
    "gcs": "LOINC//9269-2",
    "wbc": "LOINC//6690-2",
    "creatinine": "LOINC//2160-0",
    "bun": "LOINC//3094-0",
    "lactate": "LOINC//2524-7",
    "sodium": "LOINC//2951-2",
    "potassium": "LOINC//2823-3",
    "glucose": "LOINC//2345-7",
    "hemoglobin": "LOINC//718-7",
    "platelets": "LOINC//777-3",
}
#: The same labs measured in whole blood, the code some hospitals report instead.
ALT_CODES: dict[str, str] = {
    "glucose": "LOINC//2339-0",
    "lactate": "LOINC//32693-4",
    "potassium": "LOINC//6298-4",
}
DESCRIPTIONS: dict[str, str] = {
    "LOINC//8867-4": "Heart rate",
    "LOINC//8480-6": "Systolic blood pressure",
    "LOINC//9279-1": "Respiratory rate",
    "LOINC//8310-5": "Body temperature",
    "LOINC//59408-5": "Oxygen saturation in arterial blood by pulse oximetry",
    "LOINC//9269-2": "Glasgow coma score total",
    "LOINC//6690-2": "Leukocytes [#/volume] in Blood",
    "LOINC//2160-0": "Creatinine [Mass/volume] in Serum or Plasma",
    "LOINC//3094-0": "Urea nitrogen [Mass/volume] in Serum or Plasma",
    "LOINC//2524-7": "Lactate [Moles/volume] in Serum or Plasma",
    "LOINC//32693-4": "Lactate [Moles/volume] in Blood",
    "LOINC//2951-2": "Sodium [Moles/volume] in Serum or Plasma",
    "LOINC//2823-3": "Potassium [Moles/volume] in Serum or Plasma",
    "LOINC//6298-4": "Potassium [Moles/volume] in Blood",
    "LOINC//2345-7": "Glucose [Mass/volume] in Serum or Plasma",
    "LOINC//2339-0": "Glucose [Mass/volume] in Blood",
    "LOINC//718-7": "Hemoglobin [Mass/volume] in Blood",
    "LOINC//777-3": "Platelets [#/volume] in Blood",
    "ICD10CM//E11.9": "Type 2 diabetes mellitus without complications",
    "ICD10CM//N18.9": "Chronic kidney disease, unspecified",
    "ICD10CM//I50.9": "Heart failure, unspecified",
    "ICD10CM//J44.9": "Chronic obstructive pulmonary disease, unspecified",
    "ICD10CM//I10": "Essential (primary) hypertension",
    "ICD10CM//N17.9": "Acute kidney failure, unspecified",
    "ICD10CM//A41.9": "Sepsis, unspecified organism",
    "HOSPITAL_DISCHARGE": "Discharge from hospital",
    "HOSPITAL_ADMISSION": "Admission to hospital",
    BIRTH_CODE: "Birth",
    DEATH_CODE: "Death",
}
_DECIMALS0 = ("gcs", "heart_rate", "sys_bp", "resp_rate")
# feature -> (hours between measurements, or None for the vitals interval; chance one is missing)
_SCHEDULE: dict[str, tuple[float | None, float]] = {
    **{f: (None, 0.1) for f in ("heart_rate", "sys_bp", "resp_rate", "temperature", "spo2")},
    "gcs": (4.0, 0.15),
    **{f: (6.0, 0.3) for f in ("wbc", "creatinine", "bun", "sodium", "potassium", "glucose")},
    **{f: (6.0, 0.3) for f in ("hemoglobin", "platelets")},
    "lactate": (12.0, 0.4),
}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class _Events:
    """Column lists of events under construction."""

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.sid: list[np.ndarray] = []
        self.time: list[np.ndarray] = []
        self.static: list[np.ndarray] = []
        self.code: list[np.ndarray] = []
        self.value: list[np.ndarray] = []

    def add(
        self,
        sid: np.ndarray,
        code: str | np.ndarray,
        time: np.ndarray | None,
        value: np.ndarray | None = None,
    ) -> None:
        n = sid.size
        if isinstance(code, str):
            ids = np.full(n, self.codes.setdefault(code, len(self.codes)), dtype=np.int32)
        else:
            ids = np.asarray([self.codes.setdefault(str(c), len(self.codes)) for c in code], np.int32)
        self.sid.append(sid.astype(np.int64))
        self.time.append(np.zeros(n, np.int64) if time is None else time.astype(np.int64))
        self.static.append(np.full(n, time is None))
        self.code.append(ids)
        self.value.append(np.full(n, np.nan) if value is None else value.astype(np.float64))

    def table(self) -> pa.Table:
        """The events as a MEDS data table, sorted by subject, static first, then time."""
        sid, time = np.concatenate(self.sid), np.concatenate(self.time)
        static, code = np.concatenate(self.static), np.concatenate(self.code)
        value = np.concatenate(self.value)
        order = np.lexsort((time, ~static, sid))
        names = sorted(self.codes, key=self.codes.__getitem__)
        v = value[order].astype(np.float32)
        return pa.table(
            {
                "subject_id": pa.array(sid[order], pa.int64()),
                "time": pa.array(time[order].astype("datetime64[us]"), mask=static[order]),
                "code": pa.array(names, pa.string()).take(pa.array(code[order])),
                "numeric_value": pa.array(v, mask=np.isnan(v)),
            },
            schema=pa.schema(
                [
                    ("subject_id", pa.int64()),
                    ("time", pa.timestamp("us")),
                    ("code", pa.string()),
                    ("numeric_value", pa.float32()),
                ]
            ),
        )


def _measurements(
    ev: _Events,
    rng: np.random.Generator,
    sid: np.ndarray,
    t0: np.ndarray,
    feature: str,
    code: str,
    observed: np.ndarray,
    every_min: int,
    p_missing: float,
) -> None:
    """A series over ``[t0, t0 + 48 h)`` whose last kept measurement is ``observed`` exactly."""
    present = ~np.isnan(observed)
    sid, t0, v = sid[present], t0[present], observed[present]
    n, k = v.size, (48 * 60) // every_min
    if n == 0:
        return
    times = (
        t0[:, None]
        + (np.arange(k)[None, :] * every_min + rng.integers(0, max(every_min // 2, 1), (n, k)))
        * _MIN_US
    )
    keep = rng.random((n, k)) >= p_missing
    keep[~keep.any(axis=1), k - 1] = True
    last = k - 1 - np.argmax(keep[:, ::-1], axis=1)
    spread = NUMERIC[feature][1]
    values = v[:, None] + rng.normal(0.0, 0.12 * spread, (n, k))
    decimals = 0 if feature in _DECIMALS0 else 2
    values = np.round(values, decimals)
    if feature == "spo2":
        values = np.minimum(values, 100.0)
    elif feature == "gcs":
        values = np.clip(values, 3, 15)
    else:
        values = np.maximum(values, 0.01 if decimals else 1.0)
    values[np.arange(n), last] = v
    rows, cols = np.nonzero(keep)
    ev.add(sid[rows], code, times[rows, cols], values[rows, cols])


def _z(frame: pd.DataFrame, f: str) -> np.ndarray:
    x = pd.to_numeric(frame[f]).to_numpy(dtype=np.float64)
    mean, spread = NUMERIC[f][0], NUMERIC[f][1]
    return np.nan_to_num((x - mean) / spread)


def stays_to_meds(
    frame: pd.DataFrame,
    *,
    seed: int,
    site_index: int,
    coding: Mapping[str, str],
    outcomes: Sequence[str] = OUTCOMES,
    vitals_every_min: int = 60,
) -> tuple[pa.Table, dict[str, pa.Table]]:
    """One hospital's stay table (synth-ehr columns) as MEDS events and label tables.

    ``coding`` maps each numeric feature (not age) to the code this hospital reports it under.
    Seeded by ``(seed, site_index)``; see the module docstring for what is generated.
    """
    if vitals_every_min < 1 or (48 * 60) % vitals_every_min:
        raise DataError(f"vitals_every_min = {vitals_every_min}: must divide 48 h into whole minutes")
    rng = np.random.default_rng([seed, 17, site_index])
    n = len(frame)
    sid = frame["stay_id"].to_numpy(dtype=np.int64)
    t0 = _T_BASE + rng.integers(0, 3 * 365 * 1440, n) * _MIN_US
    p = t0 + PREDICTION_US
    ev = _Events()
    ev.add(sid, np.asarray([f"GENDER//{s}" for s in frame["sex"]]), None)
    age = pd.to_numeric(frame["age"]).to_numpy(dtype=np.float64)
    ev.add(sid, BIRTH_CODE, p - np.round(age * _YEAR_US).astype(np.int64))
    ev.add(sid, np.asarray([f"ADMISSION//{a.upper()}" for a in frame["admission_type"]]), t0)
    unit = frame["first_careunit"].astype(str).to_numpy()
    ev.add(sid, np.asarray([f"ICU_ADMISSION//{u}" for u in unit]), t0)
    cardiac = np.isin(unit, ["CCU", "CSRU"]).astype(float)
    history = {
        "ICD10CM//E11.9": -1.5 + 1.2 * _z(frame, "glucose"),
        "ICD10CM//N18.9": -2.0 + 1.5 * _z(frame, "creatinine"),
        "ICD10CM//I50.9": -2.0 + 1.5 * cardiac + 0.04 * (age - 65),
        "ICD10CM//J44.9": -2.2 - 0.8 * _z(frame, "spo2"),
        "ICD10CM//I10": -0.5 + 0.03 * (age - 65) + 0.5 * _z(frame, "sys_bp"),
    }
    for code, logit in history.items():
        has = rng.random(n) < _sigmoid(logit)
        days = rng.integers(30, 1500, n)
        ev.add(sid[has], code, (t0 - days * _DAY_US)[has])
    for f, (hours, p_missing) in _SCHEDULE.items():
        every = vitals_every_min if hours is None else int(hours * 60)
        observed = pd.to_numeric(frame[f]).to_numpy(dtype=np.float64)
        _measurements(ev, rng, sid, t0, f, coding[f], observed, every, p_missing)
    label = {
        o: pd.to_numeric(frame[o]).to_numpy(dtype=np.float64) if o in frame else np.full(n, np.nan)
        for o in OUTCOMES
    }
    long_stay = label["los_gt_7d"]
    los_days = np.where(
        long_stay == 1,
        rng.uniform(7.05, 25.0, n),
        np.where(long_stay == 0, rng.uniform(2.05, 6.95, n), rng.uniform(2.05, 25.0, n)),
    )
    discharge = t0 + np.round(los_days * 1440).astype(np.int64) * _MIN_US
    ev.add(sid, "HOSPITAL_DISCHARGE", discharge)
    died = label["mortality"] == 1
    ev.add(sid[died], DEATH_CODE, discharge[died])
    aki = np.where(label["aki"] == 1, rng.random(n) < 0.9, rng.random(n) < 0.02)
    ev.add(sid[aki], "ICD10CM//N17.9", discharge[aki])
    sepsis = rng.random(n) < _sigmoid(-2.0 + _z(frame, "wbc") + _z(frame, "temperature"))
    ev.add(sid[sepsis], "ICD10CM//A41.9", discharge[sepsis])
    back = (label["readmission_30d"] == 1) & ~died
    ev.add(sid[back], "HOSPITAL_ADMISSION", (discharge + rng.integers(1, 30, n) * _DAY_US)[back])
    labels = {}
    for o in outcomes:
        has = ~np.isnan(label[o])
        labels[o] = pa.table(
            {
                "subject_id": pa.array(sid[has], pa.int64()),
                "prediction_time": pa.array(p[has].astype("datetime64[us]")),
                "boolean_value": pa.array(label[o][has] == 1, pa.bool_()),
            }
        )
    return ev.table(), labels


@dataclass(frozen=True)
class SiteCoding:
    """Which code one hospital reports each numeric feature under."""

    name: str
    codes: dict[str, str]


def draw_coding(sites: int, *, seed: int, recode_rate: float) -> list[SiteCoding]:
    """Per hospital, serum or whole-blood codes for glucose, lactate and potassium."""
    if not 0.0 <= recode_rate <= 1.0:
        raise DataError(f"recode_rate = {recode_rate}: must be in [0, 1]")
    rng = np.random.default_rng([seed, 18])
    out = []
    for k in range(sites):
        codes = dict(CODES)
        for f, alt in ALT_CODES.items():
            if rng.random() < recode_rate:
                codes[f] = alt
        out.append(SiteCoding(f"hospital-{k + 1:02d}", codes))
    return out


def _splits(sid: np.ndarray, rng: np.random.Generator) -> dict[int, str]:
    order = rng.permutation(sid.size)
    n_held, n_tune = int(round(0.2 * sid.size)), int(round(0.1 * sid.size))
    names = np.full(sid.size, TRAIN_SPLIT, dtype=object)
    names[order[:n_held]] = HELD_OUT_SPLIT
    names[order[n_held : n_held + n_tune]] = TUNING_SPLIT
    return {int(s): str(n) for s, n in zip(sid, names, strict=True)}


def write_synth_meds(
    out_dir: str | Path,
    *,
    sites: int,
    seed: int = 0,
    stays: int = 400,
    shift: float = 1.0,
    outcomes: Sequence[str] = OUTCOMES,
    recode_rate: float = 0.3,
    vitals_every_min: int = 60,
    shard_subjects: int = 250,
    subject_splits: bool = False,
    windows: Sequence[str] = DEFAULT_WINDOWS,
    min_subjects: int = 20,
) -> list[Path]:
    """Write the synthetic consortium as MEDS (module docstring); returns the site YAML paths.

    ``stays`` is the mean number of stays per hospital (synth-ehr's ``mean_stays``).
    ``subject_splits`` also writes ``subject_splits.parquet`` (70 % train, 10 % tuning, 20 %
    held out, seeded); without it sites use the seeded split, which on these stays is the flat
    tables' own split. Same arguments, same bytes.
    """
    out = Path(out_dir)
    flat_paths = write_synth_ehr(
        out / "flat", sites=sites, seed=seed, mean_stays=stays, shift=shift,
        outcomes=outcomes, file_format="parquet",
    )
    codings = draw_coding(sites, seed=seed, recode_rate=recode_rate)
    paths, summary = [], []
    for k, (flat_yaml, coding) in enumerate(zip(flat_paths, codings, strict=True)):
        name = flat_yaml.parent.name
        frame = pd.read_parquet(flat_yaml.parent / "stays.parquet")
        events, labels = stays_to_meds(
            frame, seed=seed, site_index=k, coding=coding.codes, outcomes=outcomes,
            vitals_every_min=vitals_every_min,
        )
        site_dir = out / name
        splits = None
        if subject_splits:
            splits = _splits(frame["stay_id"].to_numpy(np.int64), np.random.default_rng([seed, 19, k]))
        shards = write_meds_dataset(
            site_dir / "meds", events, shard_subjects=shard_subjects,
            dataset_name=f"fedmeta-synth-meds/{name}", descriptions=DESCRIPTIONS, splits=splits,
        )
        write_labels(site_dir / "labels", labels)
        site_yaml = {
            "kind": "meds",
            "name": name,
            "path": "meds",
            "labels": {o: f"labels/{o}.parquet" for o in outcomes},
            "windows": list(windows),
            "min_subjects": min_subjects,
        }
        (site_dir / "site.yaml").write_text(yaml.safe_dump(site_yaml, sort_keys=False))
        paths.append(site_dir / "site.yaml")
        summary.append(
            {
                "name": name,
                "n_subjects": len(frame),
                "n_events": events.num_rows,
                "n_shards": len(shards),
                "coding": coding.codes,
                "recoded": sorted(f for f in ALT_CODES if coding.codes[f] == ALT_CODES[f]),
            }
        )
        log.info("synth-meds: %s: %d stays, %d events", name, len(frame), events.num_rows)
    (out / "generator.json").write_text(
        json.dumps(
            {
                "generator": "fedmeta synth-meds",
                "version": GENERATOR_VERSION,
                "n_sites": sites,
                "seed": seed,
                "mean_stays": stays,
                "shift": shift,
                "recode_rate": recode_rate,
                "vitals_every_min": vitals_every_min,
                "flat": "flat",
                "hospitals": summary,
            },
            indent=1,
        )
    )
    return paths
