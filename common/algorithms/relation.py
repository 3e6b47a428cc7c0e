"""Relation Networks across hospitals (Sung, Yang, Zhang, Xiang, Torr and Hospedales 2018).

The configured network becomes the encoder ``f`` of a :class:`~fedmeta.common.models.RelationNet`
whose learned relation module ``g`` scores each (query, class) pair from ``[c_k, f(x_q)]``,
``c_k`` the summed embeddings of class k's support examples
(:data:`fedmeta.common.meta.relation.RELATION`); training regresses ``σ(g)`` on the one-hot match
(mean squared error, as in the paper). Federated as ProtoNets are: a site returns the gradient of
its episodes' loss with respect to both ``f`` and ``g``. A new site's classifier is the class
features of its own labelled examples, scored by the shared relation module.

Networks: tables, the configured MLP's hidden layers with the last one as the embedding
(``model.hidden = [64, 64]``: ``f`` is in -> 64 -> 64, ``g`` is 128 -> 16 -> 1); images, Sung et
al.'s Conv-4 (pooling in the first two blocks only) with a relation module of two pooled conv
blocks, ``model.hidden[0]`` channels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedmeta.common.algorithms.base import Algorithm, metric_site_step
from fedmeta.common.errors import ConfigError
from fedmeta.common.meta.relation import RELATION
from fedmeta.common.models import ModelSpec

if TYPE_CHECKING:
    from fedmeta.common.config import ExperimentConfig
    from fedmeta.common.data.registry import DataSpec


def relation_network(configured: ModelSpec, cfg: ExperimentConfig, spec: DataSpec) -> ModelSpec:
    """The Relation Network around the configured embedding (module docstring)."""
    hidden = [int(h) for h in cfg.model.hidden]
    if spec.kind == "tabular":
        if cfg.model.name != "mlp" or not hidden:
            raise ConfigError("algorithm = relation on tables needs model.name = mlp with at least one hidden "
                              f"layer (the last is the embedding); got model.name = {cfg.model.name}, "
                              f"model.hidden = {hidden}")
        return ModelSpec("relation-mlp", {"in_features": spec.input_shape[0], "hidden": hidden[:-1],
                                          "embed": hidden[-1]})
    return ModelSpec("relation-conv4", {"in_channels": spec.input_shape[0], "hidden": hidden[0] if hidden else 64,
                                        "image_size": spec.input_shape[-1]})


ALGORITHM = Algorithm(
    name="relation",
    title="Federated Relation Networks",
    paper="Sung, Yang, Zhang, Xiang, Torr and Hospedales 2018",
    update_kind="gradient",
    site_step=metric_site_step(RELATION),
    evaluation="support",
    metric=RELATION,
    model=relation_network,
)
