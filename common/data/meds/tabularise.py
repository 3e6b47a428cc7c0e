"""Event streams to one feature row per (subject, prediction time), shard by shard.

For a sample with prediction time ``p`` and a window of length ``d``, the window holds the
subject's events with ``p - d <= time < p`` (``all``: every ``time < p``), plus the subject's static
events (MEDS: a null time), which describe the subject at every time and so belong to every
window. **No event at or after ``p`` enters any feature.** (MEDS label files allow data "up to and
including" the prediction time; fedmeta is stricter, because an ETL stamps many end-of-interval
facts, such as a discharge diagnosis, exactly at the boundary.)

Per window and vocabulary code the aggregations are (``v`` the code's numeric values in the
window, in time order; static values count as earlier than any timed one):

- ``count``: events of the code; ``present``: 1 if ``count > 0``, else 0;
- ``first`` / ``last``: ``v[0]`` / ``v[-1]``; ``mean``: ``sum(v) / len(v)``; ``min``, ``max``;
  NaN when the window holds no value of the code (imputed later with the training median);
- ``MEDS_BIRTH/age_years``: ``(p - birth time) / 365.25 days``, NaN without a birth event.

Which codes get which aggregations, and the column order, come from the shared
:class:`~fedmeta.common.data.meds.vocabulary.Vocabulary`. The computation is vectorised: a
batch's events are repeated once per sample of their subject (once, in the usual one-sample-per-
subject case), masked by window, and reduced with ``bincount`` / ``ufunc.at`` on the key
``sample * n_codes + code``. Memory stays bounded by the reader's batch size and
``max_elements``, whatever the size of the dataset; only the output matrix grows with it.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmeta.common.data.meds.config import window_us
from fedmeta.common.data.meds.labels import Samples
from fedmeta.common.data.meds.reader import (
    DEFAULT_BATCH_ROWS,
    CodeTable,
    EventBatch,
    iter_event_batches,
)
from fedmeta.common.data.meds.schema import BIRTH_CODE
from fedmeta.common.data.meds.vocabulary import Vocabulary
from fedmeta.common.errors import DataError

log = logging.getLogger(__name__)

US_PER_YEAR = 365.25 * 86_400_000_000
DEFAULT_MAX_ELEMENTS = 2_000_000
_VALUE_AGGS = ("first", "last", "mean", "min", "max")


@dataclass(frozen=True)
class Layout:
    """Where each ``(window, aggregation)`` block of the vocabulary lands in a feature row.

    ``blocks[i] = (window index, aggregation, columns, code slots)``: column ``columns[j]`` holds
    the aggregation of code ``codes[slots[j]]``. ``codes`` are the vocabulary's codes other than
    MEDS_BIRTH, whose age feature sits in ``age_column``.
    """

    vocabulary: Vocabulary
    codes: tuple[str, ...]
    windows: tuple[int | None, ...]
    blocks: tuple[tuple[int, str, np.ndarray, np.ndarray], ...]
    age_column: int | None
    width: int

    @classmethod
    def of(cls, vocabulary: Vocabulary) -> Layout:
        codes = tuple(c for c in vocabulary.codes if c != BIRTH_CODE)
        slot = {c: i for i, c in enumerate(codes)}
        windows = tuple(window_us(w) for w in vocabulary.windows)
        found: dict[tuple[int, str], tuple[list[int], list[int]]] = {}
        age_column = None
        for col, (w, c, a) in enumerate(vocabulary.columns()):
            if c == BIRTH_CODE:
                age_column = col
                continue
            cols, slots = found.setdefault((vocabulary.windows.index(w), a), ([], []))
            cols.append(col)
            slots.append(slot[c])
        blocks = tuple(
            (wi, a, np.asarray(cols, dtype=np.int64), np.asarray(slots, dtype=np.int64))
            for (wi, a), (cols, slots) in found.items()
        )
        return cls(vocabulary, codes, windows, blocks, age_column, vocabulary.width)

    def slots_for(self, codes: CodeTable, known: np.ndarray) -> np.ndarray:
        """Extend ``known`` (code id -> slot, -1 outside the vocabulary) to every id of ``codes``."""
        if known.size == len(codes):
            return known
        index = {c: i for i, c in enumerate(self.codes)}
        extra = [index.get(c, -1) for c in codes.codes[known.size :]]
        return np.concatenate([known, np.asarray(extra, dtype=np.int64)])


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concat(arange(s, s + n) for s, n in zip(starts, lengths))``, vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(total, dtype=np.int64)


def _reduce_window(
    layout: Layout,
    wi: int,
    x: np.ndarray,
    g: np.ndarray,
    vals: np.ndarray,
    key: np.ndarray,
    value_at: np.ndarray,
    n_events: int,
) -> None:
    """Aggregate one window's events into ``x`` (rows = the chunk's samples).

    ``g``: each event's group ``row * n_slots + slot``; ``vals``: its numeric value (NaN: none);
    ``key``: its position in the batch, static events shifted below every timed one, so that the
    largest key is the latest event; ``value_at[position]`` gives the value back.
    """
    n_rows = x.shape[0]
    n_slots = len(layout.codes)
    size = n_rows * n_slots
    blocks = [b for b in layout.blocks if b[0] == wi]
    wanted = {a for _, a, _, _ in blocks}
    out: dict[str, np.ndarray] = {}
    if wanted & {"count", "present"}:
        count = np.bincount(g, minlength=size).astype(np.float64)
        out["count"] = count
        out["present"] = (count > 0).astype(np.float64)
    if wanted & set(_VALUE_AGGS):
        ok = ~np.isnan(vals)
        gv, vv = g[ok], vals[ok]
        n_val = np.bincount(gv, minlength=size)
        none = n_val == 0
        if "mean" in wanted:
            with np.errstate(invalid="ignore", divide="ignore"):
                out["mean"] = np.bincount(gv, weights=vv, minlength=size) / n_val
        if "min" in wanted:
            m = np.full(size, np.inf)
            np.minimum.at(m, gv, vv)
            out["min"] = m
        if "max" in wanted:
            m = np.full(size, -np.inf)
            np.maximum.at(m, gv, vv)
            out["max"] = m
        if wanted & {"first", "last"}:
            kv = key[ok]
            for agg, ufunc, init in (
                ("last", np.maximum, -n_events - 1),
                ("first", np.minimum, n_events),
            ):
                if agg in wanted:
                    best = np.full(size, init, dtype=np.int64)
                    ufunc.at(best, gv, kv)
                    pos = np.where(best < 0, best + n_events, best)
                    pos[none] = 0
                    out[agg] = value_at[pos] if value_at.size else np.full(size, np.nan)
        for agg in _VALUE_AGGS:
            if agg in out:
                out[agg][none] = np.nan
    for _, agg, cols, slots in blocks:
        x[:, cols] = out[agg].reshape(n_rows, n_slots)[:, slots]


def tabularise_batch(
    batch: EventBatch,
    slot_of_code: np.ndarray,
    birth_id: int | None,
    samples: Samples,
    layout: Layout,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows of the samples whose subject is in ``batch``.

    ``slot_of_code``: reader code id -> vocabulary slot (-1: not in the vocabulary);
    ``birth_id``: the reader's id of MEDS_BIRTH, if seen. Returns ``(sample indices, rows)``,
    rows float32 ``(n, layout.width)``.
    """
    subjects, starts, lengths = batch.subject_runs()
    lo = np.searchsorted(samples.subject_id, subjects, side="left")
    hi = np.searchsorted(samples.subject_id, subjects, side="right")
    per_run = hi - lo
    rows = _ranges(lo, per_run)
    n = rows.size
    x = np.zeros((n, layout.width), dtype=np.float32)
    if n == 0:
        return rows, x
    run_of_sample = np.repeat(np.arange(subjects.size), per_run)
    p = samples.prediction_time[rows]
    run_of_event = np.repeat(np.arange(subjects.size), lengths)
    if layout.age_column is not None:
        age = np.full(n, np.nan)
        if birth_id is not None:
            births = np.flatnonzero((batch.code == birth_id) & ~batch.static)
            runs, first = np.unique(run_of_event[births], return_index=True)
            birth_time = np.full(subjects.size, np.iinfo(np.int64).min)
            birth_time[runs] = batch.time[births[first]]
            has = birth_time[run_of_sample] != np.iinfo(np.int64).min
            age[has] = (p[has] - birth_time[run_of_sample][has]) / US_PER_YEAR
        x[:, layout.age_column] = age
    slot_all = slot_of_code[batch.code]
    keep = slot_all >= 0
    if keep.all():
        time, static, slot, value = batch.time, batch.static, slot_all, batch.value
        per_run_kept = lengths
    else:
        time, static = batch.time[keep], batch.static[keep]
        slot, value = slot_all[keep], batch.value[keep]
        per_run_kept = np.bincount(run_of_event[keep], minlength=subjects.size)
    n_kept = slot.size
    # order key: position, static events shifted below every timed event
    key = np.arange(n_kept, dtype=np.int64)
    key[static] -= n_kept
    run_start = np.cumsum(per_run_kept) - per_run_kept
    seg = per_run_kept[run_of_sample]
    n_slots = len(layout.codes)
    cum = np.cumsum(seg)
    a = 0
    while a < n:  # chunks of consecutive samples whose events stay under max_elements
        base = cum[a - 1] if a else 0
        b = min(max(int(np.searchsorted(cum, base + max_elements, side="right")), a + 1), n)
        lens = seg[a:b]
        runs = run_of_sample[a:b]
        if runs[-1] - runs[0] == b - a - 1 and (b - a == 1 or (np.diff(runs) == 1).all()):
            # one sample per subject here: the chunk's events are one contiguous slice
            e0 = int(run_start[runs[0]])
            ev: slice | np.ndarray = slice(e0, e0 + int(lens.sum()))
        else:
            ev = _ranges(run_start[runs], lens)
        t, st, pt = time[ev], static[ev], np.repeat(p[a:b], lens)
        g = np.repeat(np.arange(0, (b - a) * n_slots, n_slots, dtype=np.int64), lens) + slot[ev]
        vals, k = value[ev], key[ev]
        before = st | (t < pt)
        xc = x[a:b]
        for wi, d in enumerate(layout.windows):
            inw = before if d is None else st | (before & (t >= pt - d))
            if inw.all():
                _reduce_window(layout, wi, xc, g, vals, k, value, n_kept)
            else:
                _reduce_window(layout, wi, xc, g[inw], vals[inw], k[inw], value, n_kept)
        a = b
    return rows, x


@dataclass(frozen=True)
class ShardResult:
    """One shard's feature rows and what was read."""

    rows: np.ndarray
    x: np.ndarray
    n_events: int


def tabularise_shard(
    path: Path,
    samples: Samples,
    layout: Layout,
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> ShardResult:
    """Stream one shard and tabularise the samples of its subjects."""
    codes = CodeTable()
    slots = np.zeros(0, dtype=np.int64)
    parts_rows, parts_x = [], []
    n_events = 0
    for batch in iter_event_batches(path, codes, batch_rows=batch_rows):
        slots = layout.slots_for(codes, slots)
        rows, x = tabularise_batch(
            batch, slots, codes.get(BIRTH_CODE), samples, layout, max_elements=max_elements
        )
        parts_rows.append(rows)
        parts_x.append(x)
        n_events += len(batch)
    rows = np.concatenate(parts_rows) if parts_rows else np.zeros(0, dtype=np.int64)
    x = np.concatenate(parts_x) if parts_x else np.zeros((0, layout.width), dtype=np.float32)
    return ShardResult(rows, x, n_events)


def _shard_job(
    path: Path, samples: Samples, vocab_json: str, batch_rows: int, max_elements: int
) -> ShardResult:
    layout = Layout.of(Vocabulary.from_json(vocab_json))
    return tabularise_shard(path, samples, layout, batch_rows=batch_rows, max_elements=max_elements)


def tabularise_shards(
    shards: Sequence[Path],
    samples: Samples,
    vocabulary: Vocabulary,
    *,
    workers: int = 1,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[np.ndarray, int]:
    """Feature matrix ``(len(samples), vocabulary.width)`` float32 of every sample, and the
    number of events read. ``workers > 1`` tabularises shards in that many processes.

    Every sample's subject must be in exactly one shard (:class:`DataError` otherwise).
    """
    if workers < 1:
        raise ValueError(f"workers = {workers}: must be >= 1")
    layout = Layout.of(vocabulary)
    if workers == 1 or len(shards) == 1:
        results = [
            tabularise_shard(s, samples, layout, batch_rows=batch_rows, max_elements=max_elements)
            for s in shards
        ]
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(shards)), mp_context=ctx) as pool:
            futures = [
                pool.submit(_shard_job, s, samples, vocabulary.to_json(), batch_rows, max_elements)
                for s in shards
            ]
            results = [f.result() for f in futures]
    x = np.zeros((len(samples), layout.width), dtype=np.float32)
    filled = np.zeros(len(samples), dtype=np.int64)
    for r in results:
        x[r.rows] = r.x
        np.add.at(filled, r.rows, 1)
    if (filled != 1).any():
        i = int(np.flatnonzero(filled != 1)[0])
        where = "no shard" if filled[i] == 0 else f"{int(filled[i])} shards"
        raise DataError(
            f"subject {int(samples.subject_id[i])} has a label but is in {where}; MEDS puts each "
            "subject in exactly one shard"
        )
    return x, sum(r.n_events for r in results)
