"""Parameter dicts on the wire and on disk: numpy conversion, norms, safetensors files.

Files are written with ``safetensors`` (no pickle), so loading a checkpoint never runs code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedmeta.common.errors import FedmetaError

NDArrays = dict[str, np.ndarray]


def to_numpy(params: Mapping[str, torch.Tensor]) -> NDArrays:
    """Detached float32 CPU copies, in the dict's order."""
    return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in params.items()}


def from_numpy(arrays: Mapping[str, np.ndarray], *, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v), dtype=dtype, device=device).clone() for k, v in arrays.items()}


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm over every entry of every array (float64 accumulation)."""
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays.values())))


@dataclass(frozen=True)
class ClipStats:
    """Norm of an update before clipping and the factor it was scaled by (1.0: untouched)."""

    norm: float
    factor: float

    @property
    def clipped(self) -> bool:
        return self.factor < 1.0


def clip_update(update: Mapping[str, np.ndarray], max_norm: float) -> tuple[NDArrays, ClipStats]:
    """Scale ``update`` so its global L2 norm is at most ``max_norm``: new arrays, same dtypes.

    ``factor = min(1, max_norm / ‖u‖)``; a zero update is returned unchanged (factor 1).
    """
    if not max_norm > 0:
        raise ValueError(f"clip must be > 0, got {max_norm}")
    norm = l2_norm(update)
    factor = 1.0 if norm <= max_norm else max_norm / norm
    out = {k: (np.asarray(v) * factor).astype(np.asarray(v).dtype) if factor < 1.0
           else np.array(v, copy=True) for k, v in update.items()}
    return out, ClipStats(norm=norm, factor=factor)


def add(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], scale: float = 1.0) -> NDArrays:
    """``a + scale * b`` key by key (same keys required)."""
    if a.keys() != b.keys():
        raise KeyError(f"parameter names differ: {sorted(set(a) ^ set(b))}")
    return {k: (a[k] + scale * b[k]).astype(a[k].dtype) for k in a}


def save(path: str | Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, object] | None = None) -> None:
    """Write ``arrays`` to a safetensors file atomically (temp file, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    meta = {"fedmeta": json.dumps(dict(metadata or {}), sort_keys=True)}
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=meta)
    tmp.replace(p)


def load(path: str | Path) -> tuple[NDArrays, dict[str, object]]:
    """Read a safetensors file written by :func:`save`: the arrays and the metadata dict."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise FedmetaError(f"{p}: parameter file not found")
    try:
        arrays = load_file(str(p))
        with safe_open(str(p), framework="numpy") as f:
            raw = (f.metadata() or {}).get("fedmeta", "{}")
    except (SafetensorError, OSError, ValueError) as e:
        raise FedmetaError(f"{p}: not a readable safetensors file: {e}") from e
    return arrays, json.loads(raw)
