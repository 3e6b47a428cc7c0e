"""Numpy parameter dicts <-> Flower ``ArrayRecord``, and the size of what is sent.

fedmeta packs a parameter dict into **one** ``Array`` (:data:`PACKED_STYPE`): a 4-byte
little-endian header length, a JSON header ``[[name, dtype, shape], ...]`` and the arrays' raw
bytes in that order. Flower moves every ``Array`` as two objects (the array and its chunk), each
its own request on every hop of a deployment (ServerApp -> SuperLink -> SuperNode -> site
worker and back), so a model of ``n`` tensors cost ``2n`` requests per hop; packed it costs two.
:func:`arrays_from_record` also reads a plain record of named numpy ``Array`` entries (what any
Flower app sends), and checks a packed one as untrusted input: known numeric dtypes, sizes that
add up exactly, no trailing bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from fedmeta.common.params import NDArrays

#: The ``Array.stype`` of a packed parameter dict, and its single key in the ``ArrayRecord``.
PACKED_STYPE = "fedmeta.packed/1"
PACKED_KEY = "fedmeta.packed"
_MAX_HEADER = 1 << 20  # bytes: far more than any model's names and shapes
_KINDS = "fiub"  # float, signed, unsigned, bool: nothing else is a parameter


def _header(arrays: Mapping[str, np.ndarray]) -> bytes:
    doc = [[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]
    return json.dumps(doc, separators=(",", ":")).encode()


def _c_order(value: np.ndarray) -> np.ndarray:
    """``value`` as a C-contiguous array of the same shape (0-d stays 0-d)."""
    a = np.asarray(value)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def record_from_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` holding ``arrays``, in their order, packed into one ``Array``."""
    contiguous = {k: _c_order(v) for k, v in arrays.items()}
    header = _header(contiguous)
    data = b"".join([len(header).to_bytes(4, "little"), header, *(a.tobytes() for a in contiguous.values())])
    packed = Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)
    return ArrayRecord(array_dict={PACKED_KEY: packed})


def _unpack(data: bytes) -> NDArrays:
    """The arrays of a packed buffer; ``ValueError`` naming what is wrong with it."""
    if len(data) < 4:
        raise ValueError("packed arrays: shorter than their header length")
    n = int.from_bytes(data[:4], "little")
    if n > min(_MAX_HEADER, len(data) - 4):
        raise ValueError(f"packed arrays: header length {n} exceeds the data ({len(data)} bytes)")
    try:
        doc = json.loads(data[4:4 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"packed arrays: header is not JSON ({e})") from None
    if not isinstance(doc, list):
        raise ValueError("packed arrays: header is not a list")
    out: NDArrays = {}
    offset = 4 + n
    for i, entry in enumerate(doc):
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and entry[0]
                and isinstance(entry[1], str) and isinstance(entry[2], list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[2])):
            raise ValueError(f"packed arrays: header entry {i} is not [name, dtype, shape]")
        name, dtype_text, shape = entry
        if name in out:
            raise ValueError(f"packed arrays: {name!r} appears twice")
        try:
            dtype = np.dtype(dtype_text)
        except TypeError:
            raise ValueError(f"packed arrays: {name!r} has an unknown dtype {dtype_text[:20]!r}") from None
        if dtype.kind not in _KINDS or dtype.itemsize > 8 or dtype.hasobject:
            raise ValueError(f"packed arrays: {name!r} has dtype {dtype_text[:20]!r}, not a number type")
        count = math.prod(shape)
        size = count * dtype.itemsize
        if offset + size > len(data):
            raise ValueError(f"packed arrays: {name!r} runs past the end of the data")
        out[name] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape).copy()
        offset += size
    if offset != len(data):
        raise ValueError(f"packed arrays: {len(data) - offset} bytes after the last array")
    return out


def arrays_from_record(record: ArrayRecord) -> NDArrays:
    """The numpy arrays of ``record``, by name: a packed record (:func:`record_from_arrays`) or
    one of named numpy ``Array`` entries. ``ValueError`` for anything else."""
    packed = [k for k, a in record.items() if a.stype == PACKED_STYPE]
    if packed:
        if len(record) != 1 or packed != [PACKED_KEY]:
            raise ValueError(f"packed arrays must be the record's only entry {PACKED_KEY!r}, "
                             f"found {sorted(record)[:5]}")
        return _unpack(record[PACKED_KEY].data)
    try:
        return {k: a.numpy() for k, a in record.items()}
    except Exception as e:  # noqa: BLE001 - Flower raises several types for a malformed Array
        raise ValueError(f"arrays: an entry is not a numpy array ({type(e).__name__})") from None


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialised arrays (``Array.data``) in ``record``: the parameter payload
    (for a packed record, the raw bytes of every array plus the header naming them)."""
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
