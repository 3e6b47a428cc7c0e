"""Streaming a MEDS event shard as numpy batches of whole subjects, with bounded memory.

MEDS guarantees that one subject's events sit in one shard, contiguous and sorted by time
(:class:`meds.DataSchema`). :func:`iter_event_batches` reads a shard in Parquet record batches,
converts each to numpy at once (codes to small integer ids through a :class:`CodeTable`, times to
int64 microseconds, missing numeric values to NaN) and yields batches of about ``batch_rows``
events cut at a subject boundary, so no subject is split and at most about two batches are in
memory. Every batch is checked on the way: no null ``subject_id`` or ``code``, each subject's
timed events sorted, each subject contiguous in the file; a violation raises
:class:`~fedmeta.common.errors.DataError` naming the file, the column and the 1-based row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedmeta.common.data.meds.schema import check_data_schema
from fedmeta.common.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 1_000_000


class CodeTable:
    """Code strings to dense integer ids, grown as shards are read (one table per reader).

    Parquet stores ``code`` dictionary-encoded, so each record batch carries a small dictionary;
    only its entries are looked up here, never the events one by one.
    """

    def __init__(self) -> None:
        self.codes: list[str] = []
        self._ids: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.codes)

    def get(self, code: str) -> int | None:
        """The id of ``code``, or ``None`` if no shard read so far holds it."""
        return self._ids.get(code)

    def ids(self, dictionary: pa.Array) -> np.ndarray:
        """Ids (int32) of a batch's dictionary entries, adding new codes."""
        out = np.empty(len(dictionary), dtype=np.int32)
        for i, code in enumerate(dictionary.to_pylist()):
            k = self._ids.get(code)
            if k is None:
                k = self._ids[code] = len(self.codes)
                self.codes.append(code)
            out[i] = k
        return out


@dataclass(frozen=True)
class EventBatch:
    """Whole subjects' events from one shard, in file order.

    ``time`` is in microseconds since 1970 and 0 where ``static`` (MEDS: a null time, a fact about
    the subject at every time); ``value`` is NaN where the event has no numeric value; ``code``
    holds ids of the reader's :class:`CodeTable`; ``first_row`` is the 0-based file row of
    element 0 (error messages report 1-based rows).
    """

    path: Path
    first_row: int
    subject_id: np.ndarray
    time: np.ndarray
    static: np.ndarray
    code: np.ndarray
    value: np.ndarray

    def __len__(self) -> int:
        return int(self.subject_id.shape[0])

    def subject_runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(subject ids, start, length)`` of each subject's run of events, in file order."""
        n = len(self)
        if n == 0:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        starts = np.concatenate(([0], np.flatnonzero(self.subject_id[1:] != self.subject_id[:-1]) + 1))
        lengths = np.diff(np.append(starts, n))
        return self.subject_id[starts], starts, lengths


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _convert(rb: pa.RecordBatch, codes: CodeTable, path: Path, offset: int) -> dict[str, np.ndarray]:
    """One Parquet record batch to numpy arrays, refusing nulls in subject_id and code."""
    sid = rb.column("subject_id")
    if sid.null_count:
        i = _first(sid.is_null().to_numpy(zero_copy_only=False))
        raise DataError(
            f"{path}: column 'subject_id' row {offset + i + 1} is null; every MEDS event "
            "belongs to a subject"
        )
    code = rb.column("code")
    if code.null_count:
        i = _first(code.is_null().to_numpy(zero_copy_only=False))
        raise DataError(f"{path}: column 'code' row {offset + i + 1} is null; every event has a code")
    if not pa.types.is_dictionary(code.type):
        code = code.dictionary_encode()
    ids = codes.ids(code.dictionary)[code.indices.to_numpy(zero_copy_only=False)]
    time = rb.column("time")
    static = time.is_null().to_numpy(zero_copy_only=False)
    t = time.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
    if "numeric_value" in rb.schema.names:
        value = rb.column("numeric_value").cast(pa.float64()).to_numpy(zero_copy_only=False)
    else:
        value = np.full(rb.num_rows, np.nan)
    return {
        "subject_id": sid.to_numpy(zero_copy_only=False).astype(np.int64, copy=False),
        "time": t.astype(np.int64, copy=False),
        "static": static,
        "code": ids.astype(np.int32, copy=False),
        "value": value.astype(np.float64, copy=False),
    }


def _check_order(b: EventBatch, seen: np.ndarray) -> np.ndarray:
    """Check contiguity and time order of ``b``; return ``seen`` grown by ``b``'s subjects."""
    subjects, starts, _ = b.subject_runs()
    uniq, first_idx, counts = np.unique(subjects, return_index=True, return_counts=True)
    if (counts > 1).any():
        again = np.sort(starts[np.setdiff1d(np.arange(subjects.size), first_idx)])[0]
        raise DataError(
            f"{b.path}: column 'subject_id' row {b.first_row + int(again) + 1}: subject "
            f"{int(b.subject_id[again])} appears again after other subjects; MEDS needs each "
            "subject's events contiguous in one shard"
        )
    earlier = np.isin(subjects, seen)
    if earlier.any():
        k = _first(earlier)
        raise DataError(
            f"{b.path}: column 'subject_id' row {b.first_row + int(starts[k]) + 1}: subject "
            f"{int(subjects[k])} appears again after other subjects; MEDS needs each subject's "
            "events contiguous in one shard"
        )
    sid, time, static = b.subject_id, b.time, b.static
    same = sid[1:] == sid[:-1]
    if (same & static[1:] & ~static[:-1]).any():
        # a static event after a timed one of the same subject: compare timed events only
        timed = np.flatnonzero(~static)
        back = (sid[timed[1:]] == sid[timed[:-1]]) & (time[timed[1:]] < time[timed[:-1]])
        row = int(timed[1:][_first(back)]) if back.any() else -1
    else:  # static events lead each subject (the usual layout): compare neighbours
        back = same & ~static[:-1] & (time[1:] < time[:-1])
        row = _first(back) + 1 if back.any() else -1
    if row >= 0:
        raise DataError(
            f"{b.path}: column 'time' row {b.first_row + row + 1}: subject "
            f"{int(sid[row])}'s events are not sorted by time (this event is earlier "
            "than the one before it); MEDS needs each subject's events sorted by time"
        )
    return np.union1d(seen, uniq)


def iter_event_batches(
    path: Path,
    codes: CodeTable,
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    values: bool = True,
) -> Iterator[EventBatch]:
    """Yield ``path``'s events as :class:`EventBatch` es of whole subjects (see the module
    docstring). ``values=False`` skips reading ``numeric_value`` (all NaN)."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows = {batch_rows}: must be >= 1")
    schema = check_data_schema(path)
    try:
        pf = pq.ParquetFile(path, read_dictionary=["code"])
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read the shard: {e}") from e
    if pf.metadata.num_rows == 0:
        raise DataError(
            f"{path}: empty shard (0 events). Hint: remove the file or re-run the ETL; MEDS "
            "shards hold at least one subject"
        )
    columns = ["subject_id", "time", "code"]
    if values and "numeric_value" in schema.names:
        columns.append("numeric_value")
    keys = ("subject_id", "time", "static", "code", "value")
    pending: list[dict[str, np.ndarray]] = []
    n_pending = 0
    offset = 0  # file row of the next record batch
    start = 0  # file row of pending[0]
    seen = np.zeros(0, dtype=np.int64)

    def emit(arrays: dict[str, np.ndarray], first_row: int) -> EventBatch:
        nonlocal seen
        b = EventBatch(path, first_row, **arrays)
        seen = _check_order(b, seen)
        return b

    for rb in pf.iter_batches(batch_size=batch_rows, columns=columns):
        pending.append(_convert(rb, codes, path, offset))
        offset += rb.num_rows
        n_pending += rb.num_rows
        if n_pending < batch_rows:
            continue
        merged = pending[0] if len(pending) == 1 else {
            k: np.concatenate([p[k] for p in pending]) for k in keys
        }
        sid = merged["subject_id"]
        other = np.flatnonzero(sid != sid[-1])
        if other.size == 0:  # one long subject so far: keep reading
            pending, n_pending = [merged], sid.size
            continue
        cut = int(other[-1]) + 1
        yield emit({k: v[:cut] for k, v in merged.items()}, start)
        start += cut
        pending = [{k: v[cut:] for k, v in merged.items()}]
        n_pending = sid.size - cut
    if n_pending:
        merged = pending[0] if len(pending) == 1 else {
            k: np.concatenate([p[k] for p in pending]) for k in keys
        }
        yield emit(merged, start)
