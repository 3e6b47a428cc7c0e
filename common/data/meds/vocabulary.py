"""Federated feature agreement: which codes every site tabularises, chosen from thresholded counts.

Sites must share one feature layout, yet a code's rarity at a hospital is itself sensitive (a code
seen in 3 patients nearly identifies them). The agreement therefore runs in two pure steps, with
the transport left to the federated layer:

1. **Site** (:func:`local_code_counts`, :func:`local_numeric_counts`): for every code, the number of
   the site's patients having it in an event that can enter a feature (a static event, or one
   before the patient's latest prediction time), and the number having it with a numeric value.
   A code seen in fewer than ``k = min_subjects`` patients (default 20) is *absent* from the
   message, not sent as a small number or zero. Nothing else leaves the site.
2. **Coordinator** (:func:`choose_vocabulary`): a code is eligible when at least ``min_sites``
   sites report it; eligible codes are ranked by their total count (sum over reporting sites, ties
   by code), the first ``top_n`` kept and sorted. A chosen code gets the numeric aggregations when
   any site reported it with numeric values (without the numeric messages, every chosen code gets
   them: a wider layout whose empty columns are imputed, never a silently missing feature).

The result is a :class:`Vocabulary`: codes, windows and aggregations, a deterministic feature
layout (:meth:`Vocabulary.feature_names`) and a SHA-256 :meth:`~Vocabulary.fingerprint` so that
every site can confirm it tabularises to the same layout. It round-trips through JSON.

``MEDS_BIRTH``, when chosen, contributes one column, the patient's age in years at the
prediction time, instead of window aggregations. This module imports no Flower.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from fedmeta.common.data.meds.config import (
    DEFAULT_WINDOWS,
    Aggregations,
    MedsSiteConfig,
    check_windows,
)
from fedmeta.common.data.meds.labels import build_samples, read_label_file
from fedmeta.common.data.meds.reader import CodeTable, iter_event_batches
from fedmeta.common.data.meds.schema import BIRTH_CODE, data_shards
from fedmeta.common.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_TOP_N = 256
AGE_FEATURE = "age_years"


class Vocabulary(BaseModel):
    """The consortium's shared feature layout (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = 1
    codes: tuple[str, ...]
    numeric_codes: tuple[str, ...] = ()
    windows: tuple[str, ...] = DEFAULT_WINDOWS
    aggregations: Aggregations = Aggregations()

    @field_validator("codes")
    @classmethod
    def _codes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("a vocabulary needs at least one code")
        if list(v) != sorted(set(v)):
            raise ValueError("codes must be unique and sorted")
        if any(not c for c in v):
            raise ValueError("a code is an empty string")
        return v

    @field_validator("windows")
    @classmethod
    def _windows(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return check_windows(v)

    @model_validator(mode="after")
    def _numeric_subset(self) -> Vocabulary:
        if list(self.numeric_codes) != sorted(set(self.numeric_codes)):
            raise ValueError("numeric_codes must be unique and sorted")
        extra = sorted(set(self.numeric_codes) - set(self.codes))
        if extra:
            raise ValueError(f"numeric_codes {extra[:3]} are not among the codes")
        if BIRTH_CODE in self.numeric_codes:
            raise ValueError(f"{BIRTH_CODE} gives the age column and cannot be a numeric code")
        return self

    def columns(self) -> list[tuple[str, str, str]]:
        """The layout as ``(window, code, aggregation)`` triples, in feature order: windows in
        the given order, codes sorted, the code's aggregations in the configured order; then
        ``("", MEDS_BIRTH, "age_years")`` when MEDS_BIRTH is chosen."""
        numeric = set(self.numeric_codes)
        out: list[tuple[str, str, str]] = []
        for w in self.windows:
            for c in self.codes:
                if c == BIRTH_CODE:
                    continue
                aggs = self.aggregations.numeric if c in numeric else self.aggregations.other
                out.extend((w, c, a) for a in aggs)
        if BIRTH_CODE in self.codes:
            out.append(("", BIRTH_CODE, AGE_FEATURE))
        return out

    def feature_names(self) -> tuple[str, ...]:
        """``WINDOW/CODE/AGGREGATION`` per column (``MEDS_BIRTH/age_years`` for the age)."""
        return tuple(f"{w}/{c}/{a}" if w else f"{c}/{a}" for w, c, a in self.columns())

    @property
    def width(self) -> int:
        return len(self.columns())

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): the same vocabulary, the same bytes."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Vocabulary:
        """Parse :meth:`to_json` output; :class:`ConfigError` if it is not a valid vocabulary."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ())) or "(document)"
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            raise ConfigError(f"vocabulary JSON: {where}: {msg}") from e

    def fingerprint(self) -> str:
        """SHA-256 (hex) of :meth:`to_json`: equal fingerprints mean equal layouts."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


# -- site side ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CodeCounts:
    """Exact per-code patient counts of one site. Site-private: only :func:`threshold` ed
    copies may leave the site. ``subjects[c]``: patients with code ``c`` in an event that can
    enter a feature; ``numeric[c]``: of those, patients with a numeric value for ``c``;
    ``n_subjects``: labelled patients."""

    subjects: dict[str, int]
    numeric: dict[str, int]
    n_subjects: int


_PAIR_CELLS = 1 << 24


def _subjects_per_code(run: np.ndarray, code: np.ndarray, n_runs: int, n_codes: int) -> np.ndarray:
    """Distinct runs (subjects) per code. ``run`` is non-decreasing, so runs are cut into groups
    whose ``runs x codes`` presence matrix stays under ``_PAIR_CELLS`` bytes: linear time, no sort."""
    out = np.zeros(n_codes, dtype=np.int64)
    step = max(_PAIR_CELLS // max(n_codes, 1), 1)
    bounds = np.searchsorted(run, np.arange(0, n_runs + step, step))
    for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if lo == hi:
            continue
        seen = np.zeros(step * n_codes, dtype=bool)
        seen[(run[lo:hi] - g * step) * n_codes + code[lo:hi]] = True
        out += seen.reshape(step, n_codes).sum(axis=0)
    return out


def count_codes(cfg: MedsSiteConfig, *, batch_rows: int = 1_000_000) -> CodeCounts:
    """Count, per code, the site's labelled patients having it before their latest prediction
    time (static events always count), streaming the shards. Patients without a label are not
    counted: they never become rows."""
    samples = build_samples([read_label_file(p, o) for o, p in cfg.labels.items()])
    last = np.r_[np.flatnonzero(np.diff(samples.subject_id)), len(samples) - 1]
    subj, max_p = samples.subject_id[last], samples.prediction_time[last]
    codes = CodeTable()
    subjects = np.zeros(0, dtype=np.int64)
    numeric = np.zeros(0, dtype=np.int64)
    for shard in data_shards(cfg.path):
        for b in iter_event_batches(shard, codes, batch_rows=batch_rows):
            ids, starts, lengths = b.subject_runs()
            pos = np.clip(np.searchsorted(subj, ids), 0, max(subj.size - 1, 0))
            labelled = subj[pos] == ids
            run = np.repeat(np.arange(ids.size), lengths)
            limit = np.repeat(np.where(labelled, max_p[pos], np.iinfo(np.int64).min), lengths)
            usable = np.repeat(labelled, lengths) & (b.static | (b.time < limit))
            n_codes = len(codes)
            if subjects.size < n_codes:
                subjects = np.pad(subjects, (0, n_codes - subjects.size))
                numeric = np.pad(numeric, (0, n_codes - numeric.size))
            for target, mask in ((subjects, usable), (numeric, usable & ~np.isnan(b.value))):
                target += _subjects_per_code(run[mask], b.code[mask], ids.size, n_codes)
    log.info(
        "meds site %s: %d codes in usable events of %d labelled patients",
        cfg.name, int((subjects > 0).sum()), subj.size,
    )
    return CodeCounts(
        {codes.codes[i]: int(n) for i, n in enumerate(subjects) if n > 0},
        {codes.codes[i]: int(n) for i, n in enumerate(numeric) if n > 0},
        int(subj.size),
    )


def threshold(counts: Mapping[str, int], *, min_subjects: int) -> dict[str, int]:
    """The counts of codes seen in at least ``min_subjects`` patients, sorted by code; the
    others are left out entirely (not zero)."""
    if min_subjects < 1:
        raise ConfigError(f"min_subjects = {min_subjects}: must be >= 1")
    return {c: int(n) for c, n in sorted(counts.items()) if n >= min_subjects}


def local_code_counts(cfg: MedsSiteConfig, *, min_subjects: int | None = None) -> dict[str, int]:
    """What a site sends for the agreement: patients per code, only for codes seen in at least
    ``min_subjects`` patients (default: the site file's ``min_subjects``)."""
    k = cfg.min_subjects if min_subjects is None else min_subjects
    return threshold(count_codes(cfg).subjects, min_subjects=k)


def local_numeric_counts(cfg: MedsSiteConfig, *, min_subjects: int | None = None) -> dict[str, int]:
    """Patients per code *with a numeric value*, thresholded like :func:`local_code_counts`;
    tells the coordinator which codes get value aggregations (mean, last, ...)."""
    k = cfg.min_subjects if min_subjects is None else min_subjects
    return threshold(count_codes(cfg).numeric, min_subjects=k)


# -- coordinator side -----------------------------------------------------------------------------
def _check_message(i: int, counts: Any, what: str, min_subjects: int | None) -> Mapping[str, int]:
    if not isinstance(counts, Mapping):
        raise DataError(f"site {i}: {what} is a {type(counts).__name__}, expected code -> count")
    for code, n in counts.items():
        if not isinstance(code, str) or not code:
            raise DataError(f"site {i}: {what}: code {code!r} is not a non-empty string")
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise DataError(f"site {i}: {what}: code {code!r} has count {n!r}; expected an integer >= 1")
        if min_subjects is not None and n < min_subjects:
            raise DataError(
                f"site {i}: {what}: code {code!r} has count {n} < min_subjects {min_subjects}; "
                "a site must not send counts below the threshold (message refused)"
            )
    return counts


def choose_vocabulary(
    site_counts: Sequence[Mapping[str, int]],
    *,
    min_sites: int,
    top_n: int = DEFAULT_TOP_N,
    numeric_counts: Sequence[Mapping[str, int]] | None = None,
    windows: Sequence[str] = DEFAULT_WINDOWS,
    aggregations: Aggregations | None = None,
    min_subjects: int | None = None,
) -> Vocabulary:
    """The shared vocabulary from the sites' thresholded counts (rule in the module docstring).

    ``min_subjects``, when given, makes the coordinator refuse any message holding a count below
    it (a site that did not apply the threshold). Deterministic: the same messages in any site
    order give the same vocabulary.
    """
    if not site_counts:
        raise ConfigError("choose_vocabulary: no site counts")
    if not 1 <= min_sites <= len(site_counts):
        raise ConfigError(
            f"min_sites = {min_sites}: must be between 1 and the number of sites ({len(site_counts)})"
        )
    if top_n < 1:
        raise ConfigError(f"top_n = {top_n}: must be >= 1")
    if numeric_counts is not None and len(numeric_counts) != len(site_counts):
        raise ConfigError(
            f"numeric_counts has {len(numeric_counts)} messages for {len(site_counts)} sites"
        )
    n_sites: dict[str, int] = {}
    total: dict[str, int] = {}
    for i, counts in enumerate(site_counts):
        for code, n in _check_message(i, counts, "code counts", min_subjects).items():
            n_sites[code] = n_sites.get(code, 0) + 1
            total[code] = total.get(code, 0) + int(n)
    eligible = [c for c in n_sites if n_sites[c] >= min_sites]
    if not eligible:
        raise DataError(
            f"no code is reported by at least {min_sites} of {len(site_counts)} sites; lower "
            "min_sites or the sites' min_subjects"
        )
    ranked = sorted(eligible, key=lambda c: (-total[c], c))[:top_n]
    chosen = tuple(sorted(ranked))
    if numeric_counts is None:
        numeric = tuple(c for c in chosen if c != BIRTH_CODE)
    else:
        with_values: set[str] = set()
        for i, counts in enumerate(numeric_counts):
            with_values.update(_check_message(i, counts, "numeric counts", min_subjects))
        numeric = tuple(c for c in chosen if c in with_values and c != BIRTH_CODE)
    vocab = Vocabulary(
        codes=chosen,
        numeric_codes=numeric,
        windows=tuple(windows),
        aggregations=aggregations or Aggregations(),
    )
    log.info(
        "vocabulary: %d of %d eligible codes (%d numeric), %d features, fingerprint %s",
        len(chosen), len(eligible), len(numeric), vocab.width, vocab.fingerprint()[:12],
    )
    return vocab


def site_vocabulary(cfg: MedsSiteConfig, *, top_n: int = DEFAULT_TOP_N) -> Vocabulary:
    """A vocabulary from this site's own counts alone (a site working on its own: checking its
    data, local baselines), with the site file's windows and aggregations."""
    counts = count_codes(cfg)
    k = cfg.min_subjects
    return choose_vocabulary(
        [threshold(counts.subjects, min_subjects=k)],
        min_sites=1,
        top_n=top_n,
        numeric_counts=[threshold(counts.numeric, min_subjects=k)],
        windows=cfg.windows,
        aggregations=cfg.aggregations,
    )
