"""A run's folder on the coordinator: its files, written atomically, and its checkpoints.

::

    RUN/
      config.json              the effective experiment configuration
      vocabulary.json          (MEDS sites) the agreed vocabulary and who shared counts
      rounds.jsonl             one line per round (sites sampled/accepted/rejected, losses, bytes)
      checkpoint.safetensors   the strategy's state after the last completed round
      final.safetensors        θ at the end, with the experiment config in its metadata
      summary.json             per-site metrics before/after adaptation, means, communication
      run.log                  (``fedmeta simulate``) everything the console showed, and more

Files are JSON in strict form (an undefined metric is ``null``) or safetensors (no pickle).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedmeta.common import params as P
from fedmeta.common.config import ExperimentConfig, load_config
from fedmeta.common.errors import ConfigError


def _nan_to_none(o: Any) -> Any:
    """Strict JSON: an undefined metric (e.g. AUROC of a one-class split) becomes null."""
    if isinstance(o, float) and not np.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_nan_to_none(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(data: Any, *, indent: int | None = None) -> str:
    """``data`` as strict JSON (NaN/Inf as null, numpy scalars as numbers)."""
    return json.dumps(_nan_to_none(data), indent=indent, sort_keys=indent is not None,
                      default=_json_default, allow_nan=False)


class RunFolder:
    """Paths of one run's outputs and the helpers that write them atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "config.json"
        self.rounds = root / "rounds.jsonl"
        self.checkpoint = root / "checkpoint.safetensors"
        self.final = root / "final.safetensors"
        self.summary = root / "summary.json"
        self.vocabulary = root / "vocabulary.json"

    def write_json(self, path: Path, data: Any) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(to_json(data, indent=2) + "\n")
        os.replace(tmp, path)

    def read_rounds(self, upto: int) -> list[dict]:
        """The round lines already written, up to round ``upto`` (a resumed run keeps these)."""
        if not self.rounds.exists():
            return []
        lines = [json.loads(line) for line in self.rounds.read_text().splitlines() if line.strip()]
        return [r for r in lines if r["round"] <= upto]

    def reset_rounds(self, lines: list[dict]) -> None:
        self.rounds.write_text("".join(json.dumps(r) + "\n" for r in lines))

    def append_round(self, line: dict) -> None:
        with self.rounds.open("a") as f:
            f.write(to_json(line) + "\n")

    def save_checkpoint(self, arrays: P.NDArrays, meta: dict[str, Any]) -> None:
        P.save(self.checkpoint, arrays, meta)

    def load_checkpoint(self) -> tuple[P.NDArrays, dict[str, Any]]:
        return P.load(self.checkpoint)

    def save_final(self, theta: P.NDArrays, meta: dict[str, Any]) -> None:
        P.save(self.final, theta, meta)

    def load_final(self) -> tuple[P.NDArrays, dict[str, Any]]:
        return P.load(self.final)


def load_run_config(run_dir: Path, overrides: list[str]) -> ExperimentConfig:
    """The effective config saved in a run folder, with ``key=value`` overrides (e.g. rounds)."""
    path = run_dir / "config.json"
    if not path.exists():
        raise ConfigError(f"{run_dir}: not a fedmeta run folder (no config.json)")
    return load_config(None, overrides, base=json.loads(path.read_text()))
