"""Model registry: configs pick a model by name.

>>> from fedmeta.common.models import build_model, init_params
>>> model = build_model("mlp", in_features=13, hidden=(64, 64), out_features=2)
>>> sorted(init_params(model))[:2]
['net.0.bias', 'net.0.weight']

Names: ``mlp`` (:class:`MLP`), ``linear`` (:class:`LogisticRegression`), ``conv4``
(:class:`Conv4`, ``out_features=None`` for an embedding network), ``relation-conv4`` and
``relation-mlp`` (:class:`RelationNet`, Sung et al. 2018), ``context-embedding``
(:class:`ContextEmbedding`: Matching Networks' full context embeddings around another network).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from fedmeta.common.meta.types import Params
from fedmeta.common.models.context import ContextEmbedding, context_embedding
from fedmeta.common.models.conv import BatchStatNorm2d, Conv4
from fedmeta.common.models.mlp import MLP, LogisticRegression
from fedmeta.common.models.relation import RelationNet, relation_conv4, relation_mlp

if TYPE_CHECKING:
    from fedmeta.common.config import ExperimentConfig
    from fedmeta.common.data.registry import DataSpec

__all__ = [
    "MODELS",
    "ModelSpec",
    "MLP",
    "BatchStatNorm2d",
    "Conv4",
    "LogisticRegression",
    "RelationNet",
    "ContextEmbedding",
    "build_model",
    "init_params",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "linear": LogisticRegression,
    "conv4": Conv4,
    "relation-conv4": relation_conv4,
    "relation-mlp": relation_mlp,
    "context-embedding": context_embedding,
}


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a network: ``build_model(name, **kwargs)``; the one place an experiment's
    model is decided (:meth:`for_experiment`), for training, for a bundle and for ONNX."""

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        return build_model(self.name, **dict(self.kwargs))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def for_experiment(cls, cfg: ExperimentConfig, spec: DataSpec) -> ModelSpec:
        """The configured network for inputs of ``spec.input_shape``.

        Tables: ``mlp`` or ``linear`` with ``spec.n_classes`` outputs. Images: ``conv4`` with
        ``tasks.ways`` outputs (episodes relabel their classes 0..ways-1), or one per
        meta-training class for an algorithm that trains a plain classifier (its record's
        ``head == "all_classes"``: FedAvg), or none for a metric learner, whose embedding is the
        flattened conv features (Snell et al. 2017; Vinyals et al. 2016). An algorithm whose record names a ``model`` builds
        its own network around that one (Relation Networks).
        """
        from fedmeta.common import algorithms
        from fedmeta.common.errors import ConfigError

        name = cfg.model.name
        # ``auto`` (chosen later, among the tabular candidates) builds the configured network
        algorithm = algorithms.get(cfg.algorithm) if cfg.algorithm in algorithms.names() else None
        if spec.kind == "tabular":
            if name == "conv4":
                raise ConfigError("model.name = conv4: needs image data; use mlp or linear for tables")
            if name == "linear":
                configured = cls("linear", {"in_features": spec.input_shape[0], "out_features": spec.n_classes})
            else:
                configured = cls("mlp", {"in_features": spec.input_shape[0], "hidden": list(cfg.model.hidden),
                                         "out_features": spec.n_classes})
        else:
            if name != "conv4":
                raise ConfigError(f"model.name = {name}: image data needs conv4")
            width = cfg.model.hidden[0] if cfg.model.hidden else 64
            head = algorithms.get(cfg.algorithm).head
            outputs: int | None = max(cfg.tasks.ways, spec.n_classes) if head == "all_classes" else cfg.tasks.ways
            if algorithm is not None and algorithm.metric is not None:
                outputs = None  # a metric learner embeds with the conv features, as in its paper
            configured = cls("conv4", {"in_channels": spec.input_shape[0], "hidden": width, "out_features": outputs})
        return configured if algorithm is None or algorithm.model is None else algorithm.model(configured, cfg, spec)


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build the model registered as ``name`` with its keyword arguments.

    Raises ``ValueError`` naming the model for an unknown name or bad arguments.
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for model {name!r}: {e}") from e


def init_params(model: nn.Module) -> Params:
    """The model's parameters as a dict of detached clones, keyed like ``model.named_parameters()``.

    The clones share no storage with the model, so training them never changes ``model``.
    """
    return {name: p.detach().clone() for name, p in model.named_parameters()}
