"""Reptile across hospitals (Nichol, Achiam and Schulman 2018, "On First-Order Meta-Learning
Algorithms").

A site takes one Reptile step per meta-batch it draws (``tasks.meta_batches`` per round), one
after another from its local copy of θ, and returns ``Δ_i = θ_i − θ``. The coordinator applies
``θ ← θ + β Σ_i w_i Δ_i / Σ_i w_i`` (outer SGD with ``outer.lr = β``; momentum or Adam act on the
same direction), ``w_i`` the examples site ``i`` used.
"""

from __future__ import annotations

from fedmeta.common.algorithms.base import Algorithm, SiteWork, StepResult
from fedmeta.common.meta.reptile import reptile_step
from fedmeta.common.meta.types import MetaStats


def site_step(work: SiteWork) -> StepResult:
    local = {k: v.clone() for k, v in work.theta.items()}
    total: MetaStats | None = None
    for _ in range(work.cfg.tasks.meta_batches):
        delta, stats = reptile_step(work.model, local, work.draw_tasks(), work.inner,
                                    **work.engine_options())
        local = {k: local[k] + delta[k] for k in local}
        total = stats if total is None else total + stats
    assert total is not None
    return StepResult({k: local[k] - work.theta[k] for k in work.theta}, total)


ALGORITHM = Algorithm(
    name="reptile",
    title="FedReptile",
    paper="Nichol, Achiam and Schulman 2018",
    update_kind="delta",
    site_step=site_step,
)
