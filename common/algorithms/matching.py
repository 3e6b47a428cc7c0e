"""Matching Networks across hospitals (Vinyals, Blundell, Lillicrap, Kavukcuoglu and Wierstra 2016).

A query attends over the embedded support set (a softmax of cosine similarities) and its class
distribution is the attention-weighted sum of the support labels
(:data:`fedmeta.common.meta.matching.MATCHING`). Federated as ProtoNets are: a site returns the
gradient of its episodes' query negative log-likelihood with respect to the embedding; the
coordinator averages by examples and applies its outer optimiser. A new site's classifier is its
own labelled examples, embedded; no weights move.
"""

from __future__ import annotations

from fedmeta.common.algorithms.base import Algorithm, metric_site_step
from fedmeta.common.meta.matching import MATCHING

ALGORITHM = Algorithm(
    name="matching",
    title="Federated Matching Networks",
    paper="Vinyals, Blundell, Lillicrap, Kavukcuoglu and Wierstra 2016",
    update_kind="gradient",
    site_step=metric_site_step(MATCHING),
    evaluation="support",
    metric=MATCHING,
)
