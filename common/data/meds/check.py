"""``fedmeta data check`` for a MEDS site: validate it and summarise it, on the site, in aggregates.

The summary (a JSON-ready dict, :func:`check_meds_site`) reports the shards, subjects, events and
codes; for each outcome its label prevalence per split; and the events no feature will ever use
because they are at or after the prediction time: per outcome, the events of that task's labelled
subjects at or after the subject's latest prediction time in its label file, and over all tasks
(``all_outcomes``) the events at or after the subject's latest prediction time in any label file.
A large share dropped is normal for ICU stays predicted at 48 h; all events of a subject dropped
usually means the label file's times are shifted against the data.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fedmeta.common.data.meds.config import MedsSiteConfig
from fedmeta.common.data.meds.labels import read_label_file
from fedmeta.common.data.meds.reader import CodeTable, iter_event_batches
from fedmeta.common.data.meds.schema import SPLITS_PARQUET, data_shards
from fedmeta.common.data.meds.site import read_samples
from fedmeta.common.data.meds.splits import read_subject_splits, split_samples
from fedmeta.common.data.meds.validate import validate_meds_dataset

log = logging.getLogger(__name__)

_NONE = np.iinfo(np.int64).min


def _latest(subject: np.ndarray, time: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct subjects and each one's latest time."""
    order = np.lexsort((time, subject))
    s, t = subject[order], time[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    return s[last], t[last]


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    pos = np.clip(np.searchsorted(keys, query), 0, max(keys.size - 1, 0))
    return np.where(keys[pos] == query, values[pos], _NONE)


def _share(rows: int, positive: int) -> dict[str, Any]:
    return {"rows": rows, "positive": positive, "prevalence": positive / rows if rows else None}


def check_meds_site(
    cfg: MedsSiteConfig, *, test_fraction: float = 0.34, seed: int = 43
) -> dict[str, Any]:
    """Validate the site (raising :class:`DataError` on the first problem) and summarise it."""
    info = validate_meds_dataset(cfg)
    samples = read_samples(cfg)
    splits = read_subject_splits(cfg.path)
    tf = cfg.test_fraction if cfg.test_fraction is not None else test_fraction
    sd = cfg.seed if cfg.seed is not None else seed
    if splits is not None:
        split_of = splits.lookup(samples.subject_id)
        source = str(SPLITS_PARQUET)
    else:
        train, test = split_samples(samples, None, test_fraction=tf, seed=sd)
        split_of = np.empty(len(samples), dtype=object)
        split_of[train], split_of[test] = "train", "test"
        source = f"seeded by subject (test_fraction {tf}, seed {sd})"
    names = sorted(set(split_of.tolist()))
    labels: dict[str, Any] = {}
    for j, (o, li) in enumerate(zip(samples.outcomes, info.labels, strict=True)):
        yj = samples.y[:, j]
        by_split = {}
        for s in names:
            m = (split_of == s) & (yj >= 0)
            by_split[s] = _share(int(m.sum()), int((yj[m] == 1).sum()))
        labels[o] = {"file": str(li.path), **_share(li.n_rows, li.n_positive), "by_split": by_split}
    latest_all = _latest(samples.subject_id, samples.prediction_time)
    latest_by = {
        o: _latest(f.subject_id, f.prediction_time)
        for o, f in ((o, read_label_file(p, o)) for o, p in cfg.labels.items())
    }
    dropped = {o: 0 for o in cfg.labels}
    dropped_all = unlabelled = 0
    codes = CodeTable()
    for shard in data_shards(cfg.path):
        for b in iter_event_batches(shard, codes, values=False):
            limit = _lookup(*latest_all, b.subject_id)
            unlabelled += int((limit == _NONE).sum())
            dropped_all += int(((limit != _NONE) & ~b.static & (b.time >= limit)).sum())
            for o, (subj, t) in latest_by.items():
                lim = _lookup(subj, t, b.subject_id)
                dropped[o] += int(((lim != _NONE) & ~b.static & (b.time >= lim)).sum())
    summary: dict[str, Any] = {
        "name": cfg.name,
        "path": str(cfg.path),
        "dataset": {k: info.metadata.get(k) for k in ("dataset_name", "etl_name", "meds_version")},
        "shards": len(info.shards),
        "shard_events": [
            {"file": str(s.path.relative_to(cfg.path)), "events": s.n_events, "subjects": s.n_subjects}
            for s in info.shards
        ],
        "subjects": info.n_subjects,
        "events": info.n_events,
        "static_events": info.n_static_events,
        "codes": info.n_codes,
        "samples": len(samples),
        "split_source": source,
        "split_subjects": {
            s: int(np.unique(samples.subject_id[split_of == s]).size) for s in names
        },
        "labels": labels,
        "dropped_after_prediction_time": {"all_outcomes": dropped_all, "by_outcome": dropped},
        "events_of_unlabelled_subjects": unlabelled,
    }
    log.info(
        "meds site %s: checked: %d events, %d dropped as at/after prediction time",
        cfg.name, info.n_events, dropped_all,
    )
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary of :func:`check_meds_site` as lines of text for ``fedmeta data check``."""
    lines = [
        f"site {summary['name']} (meds) from {summary['path']}",
        f"  dataset: {summary['dataset'].get('dataset_name') or '(no dataset.json)'}, "
        f"MEDS {summary['dataset'].get('meds_version') or '?'}",
        f"  shards: {summary['shards']}, subjects: {summary['subjects']:,}, events: "
        f"{summary['events']:,} ({summary['static_events']:,} static), codes: {summary['codes']:,}",
        f"  samples (subject, prediction time): {summary['samples']:,}; split: "
        f"{summary['split_source']}: "
        + ", ".join(f"{s} {n:,} subjects" for s, n in summary["split_subjects"].items()),
        "  outcomes (prevalence among labelled rows, per split):",
    ]
    for o, lab in summary["labels"].items():
        per = ", ".join(
            f"{s} {v['prevalence']:.1%} of {v['rows']:,}" if v["prevalence"] is not None else f"{s} -"
            for s, v in lab["by_split"].items()
        )
        lines.append(f"    {o:<24} {lab['prevalence']:6.1%} of {lab['rows']:,}  ({per})")
    dropped = summary["dropped_after_prediction_time"]
    lines.append(
        f"  events at or after the prediction time (never used): {dropped['all_outcomes']:,} "
        f"of {summary['events']:,}"
    )
    for o, n in dropped["by_outcome"].items():
        lines.append(f"    for {o:<20} {n:,}")
    if summary["events_of_unlabelled_subjects"]:
        lines.append(f"  events of subjects without any label: {summary['events_of_unlabelled_subjects']:,}")
    return lines
