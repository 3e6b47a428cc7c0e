"""Encoding of parameter updates for the wire: float32, fp16, int8 with a per-tensor scale, top-k.

``encode`` runs on the site, ``decode`` on the server; both are pure numpy. Encoded arrays keep the
parameter's name, with suffixes for the parts of one tensor:

- ``none``: ``name`` float32.  ``fp16``: ``name`` float16.
- ``int8``: ``name`` int8 and ``name::scale`` float32 of shape (1,), value ``max|u| / 127``;
  ``u ≈ scale · q`` with ``q = round(u / scale)``.
- ``topk``: ``name::idx`` int32 flat indices and ``name::val`` float32 values of the
  ``ceil(fraction · size)`` entries largest in magnitude. With error feedback (Stich et al. 2018;
  Karimireddy et al. 2019) the site adds what it left out last time before choosing, so every
  coordinate is eventually sent: ``e ← (u + e) − topk(u + e)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedmeta.common.errors import DeltaError
from fedmeta.common.params import NDArrays

METHODS = ("none", "fp16", "int8", "topk")


def encode(
    update: Mapping[str, np.ndarray],
    method: str,
    *,
    topk_fraction: float = 0.1,
    error: Mapping[str, np.ndarray] | None = None,
) -> tuple[NDArrays, NDArrays]:
    """Encode ``update``; returns ``(encoded arrays, new error-feedback residual)``.

    The residual is all zeros except for ``topk``; keep it on the site and pass it back next round.
    """
    if method not in METHODS:
        raise ValueError(f"compression.method = {method!r}: use one of {METHODS}")
    out: NDArrays = {}
    residual: NDArrays = {}
    for name, u in update.items():
        u = np.asarray(u, dtype=np.float32)
        if method == "none":
            out[name] = u
        elif method == "fp16":
            out[name] = u.astype(np.float16)
        elif method == "int8":
            peak = float(np.max(np.abs(u))) if u.size else 0.0
            scale = peak / 127.0 if peak > 0 else 1.0
            out[name] = np.clip(np.rint(u / scale), -127, 127).astype(np.int8)
            out[f"{name}::scale"] = np.array([scale], dtype=np.float32)
        else:
            corrected = u + (np.asarray(error[name], dtype=np.float32) if error and name in error else 0.0)
            flat = corrected.reshape(-1)
            k = max(1, math.ceil(topk_fraction * flat.size))
            idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :] if k < flat.size else np.arange(flat.size)
            idx = np.sort(idx).astype(np.int32)
            out[f"{name}::idx"] = idx
            out[f"{name}::val"] = flat[idx].astype(np.float32)
            sent = np.zeros_like(flat)
            sent[idx] = flat[idx]
            residual[name] = (flat - sent).reshape(u.shape)
            continue
        residual[name] = np.zeros_like(u)
    return out, residual


def decode(
    encoded: Mapping[str, np.ndarray],
    method: str,
    reference: Mapping[str, np.ndarray],
    *,
    source: str = "reply",
) -> NDArrays:
    """Rebuild float32 arrays shaped like ``reference``; malformed input raises :class:`DeltaError`."""
    if method not in METHODS:
        raise DeltaError(f"{source}: unknown encoding {method!r}; expected one of {METHODS}")
    expected = {
        "none": lambda n: [n], "fp16": lambda n: [n], "int8": lambda n: [n, f"{n}::scale"],
        "topk": lambda n: [f"{n}::idx", f"{n}::val"],
    }[method]
    want = {key for n in reference for key in expected(n)}
    if set(encoded) != want:
        extra, missing = sorted(set(encoded) - want), sorted(want - set(encoded))
        raise DeltaError(f"{source}: {method} arrays do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    dtypes = {"none": np.float32, "fp16": np.float16, "int8": np.int8}
    out: NDArrays = {}
    for name, ref in reference.items():
        if method in dtypes:
            a = np.asarray(encoded[name])
            if a.dtype != dtypes[method]:
                raise DeltaError(f"{source}: {name} has dtype {a.dtype}, {method} needs {np.dtype(dtypes[method])}")
            if a.shape != ref.shape:
                raise DeltaError(f"{source}: {name} has shape {a.shape}, expected {ref.shape}")
            value = a.astype(np.float32)
            if method == "int8":
                scale = np.asarray(encoded[f"{name}::scale"], dtype=np.float32).reshape(-1)
                if scale.shape != (1,) or not np.isfinite(scale[0]):
                    raise DeltaError(f"{source}: {name}::scale must be one finite number")
                value = value * scale[0]
            out[name] = value
        else:
            idx = np.asarray(encoded[f"{name}::idx"])
            val = np.asarray(encoded[f"{name}::val"])
            if idx.ndim != 1 or val.shape != idx.shape or idx.dtype.kind not in "iu":
                raise DeltaError(f"{source}: {name} top-k indices {idx.shape} and values {val.shape} do not pair up")
            if idx.size and (idx.min() < 0 or idx.max() >= ref.size or len(np.unique(idx)) != idx.size):
                raise DeltaError(f"{source}: {name} top-k indices out of range or repeated for size {ref.size}")
            flat = np.zeros(ref.size, dtype=np.float32)
            flat[idx] = val.astype(np.float32)
            out[name] = flat.reshape(ref.shape)
    return out


def checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """A short digest of the arrays' names, shapes and bytes (to check a node's cached θ)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:24]
