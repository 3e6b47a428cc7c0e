"""MAML across hospitals, second order (``maml``) or first order (``fomaml``).

MAML (Finn, Abbeel and Levine 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks"): each task adapts θ on its support set with ``inner.steps`` SGD steps and scores the
adapted weights on its query set. A site returns the meta-gradient of the mean query loss,
``g_i = ∇_θ mean_t L_q(φ_t(θ))`` — through the inner steps (second order) or treating them as
constant (first order) — averaged over the ``tasks.meta_batches`` meta-batches it drew. The
coordinator applies its outer optimiser to ``ḡ = Σ_i w_i g_i / Σ_i w_i``: the federated
meta-learning of Chen et al. 2018 ("Federated Meta-Learning with Fast Convergence and Efficient
Communication").
"""

from __future__ import annotations

from fedmeta.common.algorithms.base import (
    Algorithm,
    MetaGradient,
    SiteWork,
    StepResult,
    averaged_meta_gradient,
)
from fedmeta.common.meta.maml import maml_step
from fedmeta.common.meta.types import TaskBatch


def site_step(work: SiteWork) -> StepResult:
    def step(tasks: TaskBatch) -> MetaGradient:
        g, stats = maml_step(work.model, work.theta, tasks, work.inner, **work.engine_options())
        return g, {}, stats

    return averaged_meta_gradient(work, step)


ALGORITHM = Algorithm(
    name="maml",
    title="FedMAML",
    paper="Finn, Abbeel and Levine 2017",
    update_kind="gradient",
    site_step=site_step,
)

FIRST_ORDER = Algorithm(
    name="fomaml",
    title="FedFOMAML",
    paper="Finn, Abbeel and Levine 2017 (first-order approximation)",
    update_kind="gradient",
    site_step=site_step,
    first_order=True,
)

#: Both records, first order first (the registry reads this).
ALGORITHMS = (FIRST_ORDER, ALGORITHM)
