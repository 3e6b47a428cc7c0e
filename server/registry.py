"""``algorithm`` name -> server strategy class."""

from __future__ import annotations

import numpy as np

from fedmeta.common.config import ExperimentConfig
from fedmeta.common.params import NDArrays
from fedmeta.server.fedavg import FedAvgFineTune
from fedmeta.server.reptile import FedReptile
from fedmeta.server.strategy import FedMetaStrategy

STRATEGIES: dict[str, type[FedMetaStrategy]] = {
    "reptile": FedReptile,
    "fedavg": FedAvgFineTune,
}


def make_strategy(
    cfg: ExperimentConfig, theta: NDArrays, *, node_names: dict[int, str], rng: np.random.Generator
) -> FedMetaStrategy:
    try:
        cls = STRATEGIES[cfg.algorithm]
    except KeyError:
        raise NotImplementedError(f"algorithm {cfg.algorithm!r} has no server strategy yet") from None
    return cls(cfg, theta, node_names=node_names, rng=rng)
