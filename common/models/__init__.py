"""Model registry: configs pick a model by name.

>>> from fedmeta.common.models import build_model, init_params
>>> model = build_model("mlp", in_features=13, hidden=(64, 64), out_features=2)
>>> sorted(init_params(model))[:2]
['net.0.bias', 'net.0.weight']

Names: ``mlp`` (:class:`MLP`), ``linear`` (:class:`LogisticRegression`), ``conv4``
(:class:`Conv4`, ``out_features=None`` for an embedding network), ``relation-conv4`` and
``relation-mlp`` (:class:`RelationNet`, Sung et al. 2018).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fedmeta.common.meta.types import Params
from fedmeta.common.models.conv import BatchStatNorm2d, Conv4
from fedmeta.common.models.mlp import MLP, LogisticRegression
from fedmeta.common.models.relation import RelationNet, relation_conv4, relation_mlp

__all__ = [
    "MODELS",
    "MLP",
    "BatchStatNorm2d",
    "Conv4",
    "LogisticRegression",
    "RelationNet",
    "build_model",
    "init_params",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "linear": LogisticRegression,
    "conv4": Conv4,
    "relation-conv4": relation_conv4,
    "relation-mlp": relation_mlp,
}


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
