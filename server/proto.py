"""FedProto: a Prototypical Network embedding trained across sites.

Prototypical Networks (Snell, Swersky and Zemel 2017): an episode's classes are represented by
the mean embedding of their support examples and queries are classified by softmax over negative
squared distances to these prototypes. Each site returns the gradient of its episodes' query loss
with respect to the embedding's parameters; the server averages by examples and applies the outer
optimiser. No adaptation of weights is needed at a new site: it computes prototypes from its own
few labelled examples.
"""

from __future__ import annotations

from fedmeta.server.strategy import FedMetaStrategy


class FedProto(FedMetaStrategy):
    name = "FedProto"
    update_kind = "gradient"
