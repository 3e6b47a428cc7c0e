"""Numpy parameter dicts <-> Flower ``ArrayRecord``, and the size of what is sent."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from fedmeta.common.params import NDArrays


def record_from_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` holding ``arrays`` in their order (contiguous copies where needed)."""
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def arrays_from_record(record: ArrayRecord) -> NDArrays:
    """The numpy arrays of ``record``, by name."""
    return {k: a.numpy() for k, a in record.items()}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialised arrays (``Array.data``) in ``record``: the parameter payload."""
    return int(sum(len(a.data) for a in record.values()))


MetricValues = dict[str, int | float | list[int] | list[float]]


def number_in(record: MetricRecord | ConfigRecord, key: str) -> float:
    """``record[key]`` as a number; a missing or non-numeric entry is a ``ValueError`` naming it."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"entry {key!r} is {type(value).__name__}, expected a number")
    return float(value)


def count_in(record: MetricRecord | ConfigRecord, key: str) -> int:
    """``record[key]`` as a whole, non-negative count (``ValueError`` otherwise)."""
    value = number_in(record, key)
    if value < 0 or value != int(value):
        raise ValueError(f"entry {key!r} = {value!r} is not a count")
    return int(value)


def text_in(record: ConfigRecord, key: str) -> str:
    """``record[key]`` as a string (``ValueError`` when missing or of another type)."""
    value = record.get(key)
    if not isinstance(value, str):
        raise ValueError(f"entry {key!r} is {type(value).__name__}, expected text")
    return value
