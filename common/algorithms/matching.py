"""Matching Networks across hospitals (Vinyals, Blundell, Lillicrap, Kavukcuoglu and Wierstra 2016).

A query attends over the embedded support set (a softmax of cosine similarities) and its class
distribution is the attention-weighted sum of the support labels
(:data:`fedmeta.common.meta.matching.MATCHING`). Federated as ProtoNets are: a site returns the
gradient of its episodes' query negative log-likelihood with respect to the embedding; the
coordinator averages by examples and applies its outer optimiser. A new site's classifier is its
own labelled examples, embedded; no weights move.

``matching-fce``: the same with the paper's full context embeddings
(:class:`fedmeta.common.models.ContextEmbedding` around the configured network: a bidirectional
LSTM reads the embedded support set, an attention LSTM each query against it; 3 steps). Its ONNX
export is refused (the LSTMs are not written as ONNX nodes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedmeta.common.algorithms.base import Algorithm, metric_site_step
from fedmeta.common.meta.matching import MATCHING, MATCHING_FCE
from fedmeta.common.models import ModelSpec

if TYPE_CHECKING:
    from fedmeta.common.config import ExperimentConfig
    from fedmeta.common.data.registry import DataSpec


def context_network(configured: ModelSpec, cfg: ExperimentConfig, spec: DataSpec) -> ModelSpec:
    """The configured network (its flattened output is the embedding) with full context embeddings;
    the LSTMs' width is the embedding's, found by a forward pass on PyTorch's ``meta`` device
    (shapes only, no storage)."""
    import torch

    with torch.device("meta"):
        width = configured.build()(torch.empty(1, *spec.input_shape)).flatten(start_dim=1).shape[1]
    return ModelSpec("context-embedding", {"encoder": configured.to_dict(), "dim": int(width)})

ALGORITHM = Algorithm(
    name="matching",
    title="Federated Matching Networks",
    paper="Vinyals, Blundell, Lillicrap, Kavukcuoglu and Wierstra 2016",
    update_kind="gradient",
    site_step=metric_site_step(MATCHING),
    evaluation="support",
    metric=MATCHING,
)

FULL_CONTEXT = Algorithm(
    name="matching-fce",
    title="Federated Matching Networks with full context embeddings",
    paper="Vinyals, Blundell, Lillicrap, Kavukcuoglu and Wierstra 2016",
    update_kind="gradient",
    site_step=metric_site_step(MATCHING_FCE),
    evaluation="support",
    metric=MATCHING_FCE,
    model=context_network,
)

#: Both records (the registry reads this).
ALGORITHMS = (ALGORITHM, FULL_CONTEXT)
