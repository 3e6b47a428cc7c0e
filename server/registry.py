"""``algorithm`` name -> server strategy class."""

from __future__ import annotations

import numpy as np

from fedmeta.common.config import ExperimentConfig
from fedmeta.common.params import NDArrays
from fedmeta.server.fedavg import FedAvgFineTune
from fedmeta.server.maml import FedMAML
from fedmeta.server.metasgd import FedMetaSGD
from fedmeta.server.proto import FedProto
from fedmeta.server.reptile import FedReptile
from fedmeta.server.strategy import FedMetaStrategy

STRATEGIES: dict[str, type[FedMetaStrategy]] = {
    "reptile": FedReptile,
    "fomaml": FedMAML,
    "maml": FedMAML,
    "metasgd": FedMetaSGD,
    "protonet": FedProto,
    "fedavg": FedAvgFineTune,
}


def make_strategy(
    cfg: ExperimentConfig, theta: NDArrays, *, node_names: dict[int, str], rng: np.random.Generator
) -> FedMetaStrategy:
    return STRATEGIES[cfg.algorithm](cfg, theta, node_names=node_names, rng=rng)
