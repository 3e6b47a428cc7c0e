"""Prototypical Networks across hospitals (Snell, Swersky and Zemel 2017).

An episode's classes are represented by the mean embedding of their support examples; queries
are classified by a softmax over negative squared distances to these prototypes
(:data:`fedmeta.common.meta.protonet.PROTOTYPES`). A site returns the gradient of its episodes'
query loss with respect to the embedding's parameters (averaged over its meta-batches); the
coordinator averages by examples and applies its outer optimiser. A new site needs no weight
adaptation: its own few labelled examples give the prototypes.
"""

from __future__ import annotations

from fedmeta.common.algorithms.base import Algorithm, metric_site_step
from fedmeta.common.meta.protonet import PROTOTYPES

ALGORITHM = Algorithm(
    name="protonet",
    title="FedProto",
    paper="Snell, Swersky and Zemel 2017",
    update_kind="gradient",
    site_step=metric_site_step(PROTOTYPES),
    evaluation="support",
    metric=PROTOTYPES,
)
