"""Update encodings: error bounds, exact byte layouts, error feedback, malformed input."""

import numpy as np
import pytest

from fedmeta.common.compression import checksum, decode, encode
from fedmeta.common.errors import DeltaError

RNG = np.random.default_rng(0)
UPDATE = {"w": RNG.normal(size=(8, 5)).astype(np.float32), "b": RNG.normal(size=5).astype(np.float32)}


def test_none_is_exact_and_fp16_is_close():
    enc, _ = encode(UPDATE, "none")
    for k in UPDATE:
        np.testing.assert_array_equal(decode(enc, "none", UPDATE)[k], UPDATE[k])
    enc, _ = encode(UPDATE, "fp16")
    assert all(v.dtype == np.float16 for v in enc.values())
    dec = decode(enc, "fp16", UPDATE)
    for k in UPDATE:
        np.testing.assert_allclose(dec[k], UPDATE[k], rtol=1e-3, atol=1e-4)


def test_int8_error_at_most_half_a_step():
    enc, _ = encode(UPDATE, "int8")
    dec = decode(enc, "int8", UPDATE)
    for k, u in UPDATE.items():
        scale = np.abs(u).max() / 127
        assert enc[f"{k}::scale"][0] == pytest.approx(scale)
        assert np.abs(dec[k] - u).max() <= scale / 2 + 1e-7
        assert enc[k].dtype == np.int8 and enc[k].nbytes == u.size


def test_topk_keeps_the_largest_and_feedback_loses_nothing():
    u = {"v": np.array([0.1, -5.0, 0.2, 3.0, -0.05, 0.0, 1.0, 0.3, -0.4, 2.0], np.float32)}
    enc, res = encode(u, "topk", topk_fraction=0.3)
    assert enc["v::idx"].tolist() == [1, 3, 9]
    np.testing.assert_array_equal(enc["v::val"], [-5.0, 3.0, 2.0])
    np.testing.assert_allclose(decode(enc, "topk", u)["v"] + res["v"], u["v"])
    # With error feedback, what was sent over rounds plus the residual equals what was produced.
    total_sent, residual, total_in = np.zeros(10, np.float32), None, np.zeros(10, np.float32)
    for _ in range(5):
        step = {"v": RNG.normal(size=10).astype(np.float32)}
        total_in += step["v"]
        enc, residual = encode(step, "topk", topk_fraction=0.2, error=residual)
        total_sent += decode(enc, "topk", step)["v"]
    np.testing.assert_allclose(total_sent + residual["v"], total_in, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "mutate", "message"),
    [
        ("none", lambda e: {**e, "extra": np.zeros(1, np.float32)}, "unexpected"),
        ("none", lambda e: {k: v for k, v in e.items() if k != "b"}, "missing"),
        ("fp16", lambda e: {k: v.astype(np.float32) for k, v in e.items()}, "dtype float32, fp16 needs float16"),
        ("int8", lambda e: {**e, "w": np.zeros((2, 2), np.int8)}, r"shape \(2, 2\), expected \(8, 5\)"),
        ("int8", lambda e: {**e, "w::scale": np.array([np.nan], np.float32)}, "one finite number"),
        ("topk", lambda e: {**e, "w::idx": np.array([0, 0, 1, 2], np.int32)}, "out of range or repeated"),
        ("topk", lambda e: {**e, "w::idx": e["w::idx"] + 1000}, "out of range"),
        ("topk", lambda e: {**e, "w::val": e["w::val"][:-1]}, "do not pair up"),
        ("zip", lambda e: e, "unknown encoding"),
    ],
)
def test_malformed_encodings_are_rejected(method, mutate, message):
    enc, _ = encode(UPDATE, "none" if method == "zip" else method, topk_fraction=0.1)
    with pytest.raises(DeltaError, match=message):
        decode(mutate(enc), method, UPDATE, source="site X")


def test_checksum_sees_every_bit():
    a = {"w": np.zeros(3, np.float32)}
    b = {"w": np.array([0.0, 0.0, np.float32(1e-30)], np.float32)}
    assert checksum(a) == checksum({"w": np.zeros(3, np.float32)}) != checksum(b)
