"""The federated generalised linear model: logistic regression fitted exactly across sites.

Each round every site returns the sums of its rows' gradient and Hessian at the coordinator's
coefficients, and the coordinator takes the Newton–Raphson step on their total
(:mod:`fedmeta.common.glm`; DataSHIELD's ``ds.glm`` works the same way, Gaye et al. 2014). The
result equals the pooled-data logistic regression with the same L2 penalty. It is the reference
row of every benchmark, and one of the candidates ``algorithm: auto`` chooses among.

The rounds are Newton steps, not the meta-learning rounds the other algorithms' ``site_step``
serves: the record says so with ``procedure = "newton"`` and the coordinator drives it
(:mod:`fedmeta.server.glm`); a site answers it with :func:`fedmeta.common.glm.site_sums`.
"""

from __future__ import annotations

from fedmeta.common.algorithms.base import Algorithm, SiteWork, StepResult
from fedmeta.common.errors import ConfigError


def site_step(work: SiteWork) -> StepResult:
    raise ConfigError("algorithm glm is fitted by Newton steps on summed gradients and Hessians, "
                      "not by meta-learning rounds")


ALGORITHM = Algorithm(
    name="glm",
    title="Federated logistic regression (Newton-Raphson on summed sums)",
    paper="Gaye et al. 2014 (DataSHIELD)",
    update_kind="gradient",
    site_step=site_step,
    procedure="newton",
    max_examples=lambda cfg, spec, n_train: n_train,
    secure_aggregation="its Newton steps need the sites' gradient and Hessian sums, not a mean update",
)
