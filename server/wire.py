"""Server side of the wire format: ArrayRecord <-> numpy dicts, decoding replies, byte counts."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedmeta.common.compression import decode
from fedmeta.common.errors import DeltaError
from fedmeta.common.params import NDArrays


def record_from_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def arrays_from_record(record: ArrayRecord) -> NDArrays:
    return {k: a.numpy() for k, a in record.items()}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialised arrays (``Array.data``) in ``record``: the parameter payload."""
    return int(sum(len(a.data) for a in record.values()))


def decode_update(
    record: ArrayRecord, encoding: ConfigRecord | None, *, site: str, reference: Mapping[str, np.ndarray]
) -> NDArrays:
    """Decode a reply's arrays to float32 arrays shaped like ``reference``.

    ``encoding['method']`` says how they were encoded (default ``none``).
    """
    try:
        arrays = arrays_from_record(record)
    except (ValueError, TypeError) as e:
        raise DeltaError(f"site {site}: update arrays cannot be deserialised: {e}") from e
    method = str(encoding["method"]) if encoding and "method" in encoding else "none"
    return decode(arrays, method, reference, source=f"site {site}")
