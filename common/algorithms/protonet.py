"""Prototypical Networks across hospitals (Snell, Swersky and Zemel 2017).

An episode's classes are represented by the mean embedding of their support examples; queries
are classified by a softmax over negative squared distances to these prototypes. A site returns
the gradient of its episodes' query loss with respect to the embedding's parameters (averaged
over its meta-batches); the coordinator averages by examples and applies its outer optimiser. A
new site needs no weight adaptation: its own few labelled examples give the prototypes.
"""

from __future__ import annotations

from fedmeta.common.algorithms.base import (
    Algorithm,
    MetaGradient,
    SiteWork,
    StepResult,
    averaged_meta_gradient,
)
from fedmeta.common.errors import DataError
from fedmeta.common.meta.protonet import protonet_step
from fedmeta.common.meta.types import TaskBatch


def site_step(work: SiteWork) -> StepResult:
    missing = [c for c in range(work.n_way) if not work.class_counts.get(c, 0)]
    if missing and work.n_way == 2:
        raise DataError(
            f"site {work.site}: ProtoNet episodes need both classes, but the training split has "
            f"no patient with outcome {work.outcome} = {missing[0]}; this site can only be scored"
        )

    def step(tasks: TaskBatch) -> MetaGradient:
        g, stats = protonet_step(work.model, work.theta, tasks, n_way=work.n_way, **work.engine_options())
        return g, {}, stats

    return averaged_meta_gradient(work, step)


ALGORITHM = Algorithm(
    name="protonet",
    title="FedProto",
    paper="Snell, Swersky and Zemel 2017",
    update_kind="gradient",
    site_step=site_step,
    evaluation="prototypes",
)
