"""Parameter dicts on the wire: one packed Array per record, read back exactly, and checked as
untrusted input (a hostile coordinator or site controls every byte)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedmeta.protocol.records import (
    PACKED_KEY,
    PACKED_STYPE,
    arrays_from_record,
    payload_bytes,
    record_from_arrays,
)


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "net.0.weight": rng.normal(size=(4, 3)).astype(np.float32).T,  # not C-contiguous
        "net.0.bias": rng.normal(size=4).astype(np.float32),
        "scale": np.array(0.5, dtype=np.float16),  # 0-d stays 0-d
        "empty": np.zeros((0, 3), dtype=np.float64),
        "idx::topk": np.array([7, 1, 2], dtype=np.int64),
        "q": np.array([-127, 0, 127], dtype=np.int8),
        "mask": np.array([True, False]),
    }


def _packed(header: object, payload: bytes = b"", *, raw_header: bytes | None = None) -> ArrayRecord:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    data = len(text).to_bytes(4, "little") + text + payload
    return ArrayRecord(array_dict={PACKED_KEY: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE,
                                                     data=data)})


def test_a_parameter_dict_round_trips_exactly_in_one_array():
    arrays = _arrays()
    record = record_from_arrays(arrays)
    assert list(record) == [PACKED_KEY]
    back = arrays_from_record(record)
    assert list(back) == list(arrays)  # order kept
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v)
        assert back[k].flags.writeable and back[k].flags.c_contiguous
    header = json.dumps([[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()], separators=(",", ":"))
    assert payload_bytes(record) == 4 + len(header) + sum(v.nbytes for v in arrays.values())


def test_packing_cuts_the_objects_flower_moves_per_message():
    arrays = {k: v for k, v in _arrays().items() if v.ndim > 0}  # 6 tensors
    plain = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    n_plain = len(get_all_nested_objects(RecordDict({"u": plain})))
    n_packed = len(get_all_nested_objects(RecordDict({"u": record_from_arrays(arrays)})))
    # record dict + array record, then an array and its chunk per tensor, against one of each
    assert (n_plain, n_packed) == (2 + 2 * 6, 2 + 2)


def test_a_plain_record_of_named_numpy_arrays_is_still_read():
    arrays = {k: v for k, v in _arrays().items() if v.ndim > 0}
    plain = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    back = arrays_from_record(plain)
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)


GOOD = [["w", "<f4", [2]]]
W = np.array([1.0, 2.0], dtype=np.float32).tobytes()


@pytest.mark.parametrize(("record", "message"), [
    (ArrayRecord(array_dict={PACKED_KEY: Array(dtype="uint8", shape=(2,), stype=PACKED_STYPE, data=b"\x01\x00")}),
     "shorter than their header length"),
    (ArrayRecord(array_dict={PACKED_KEY: Array(dtype="uint8", shape=(8,), stype=PACKED_STYPE,
                                               data=(1000).to_bytes(4, "little") + b"[]  ")}),
     "header length 1000 exceeds the data"),
    (_packed(None, W, raw_header=b"{not json"), "header is not JSON"),
    (_packed({"w": 1}, W), "header is not a list"),
    (_packed([["w", "<f4"]], W), "header entry 0 is not"),
    (_packed([["w", "<f4", [-2]]], W), "header entry 0 is not"),
    (_packed([["", "<f4", [2]]], W), "header entry 0 is not"),
    (_packed([["w", "<f4", [1]], ["w", "<f4", [1]]], W), "'w' appears twice"),
    (_packed([["w", "not-a-dtype", [2]]], W), "unknown dtype"),
    (_packed([["w", "|O", [2]]], W), "not a number type"),
    (_packed([["w", "<U4", [2]]], W), "not a number type"),
    (_packed([["w", "<c16", [1]]], W), "not a number type"),
    (_packed([["w", "<f4", [3]]], W), "'w' runs past the end"),
    (_packed([["w", "<f4", [1_000_000_000, 1_000_000_000]]], W), "'w' runs past the end"),
    (_packed(GOOD, W + b"\x00"), "1 bytes after the last array"),
])
def test_a_malformed_packed_record_is_refused_with_what_is_wrong(record, message):
    with pytest.raises(ValueError, match=message):
        arrays_from_record(record)


def test_a_packed_array_beside_other_entries_is_refused():
    record = record_from_arrays({"w": np.ones(2, np.float32)})
    record["extra"] = Array(np.ones(2, np.float32))
    with pytest.raises(ValueError, match="only entry"):
        arrays_from_record(record)
    renamed = ArrayRecord(array_dict={"other": record_from_arrays({"w": np.ones(2, np.float32)})[PACKED_KEY]})
    with pytest.raises(ValueError, match="only entry"):
        arrays_from_record(renamed)


def test_a_well_formed_hand_built_record_decodes():
    np.testing.assert_array_equal(arrays_from_record(_packed(GOOD, W))["w"], [1.0, 2.0])
