"""FedAvg with local fine-tuning: the baseline fedmeta is measured against.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data"): a site runs ``fedavg.local_steps`` minibatch SGD steps of size
``fedavg.lr`` on its own training rows from θ and returns ``Δ_i``; the coordinator applies
``θ ← θ + η Σ_i w_i Δ_i / Σ_i w_i``. Sites then score θ after local fine-tuning, as FLamby's
"FedAvg + local fine-tuning" (Ogier du Terrail et al. 2022). The weight of a reply is the site's
training rows, so it may not claim more than the site declared at the handshake.
"""

from __future__ import annotations

import torch

from fedmeta.common.algorithms.base import Algorithm, SiteWork, StepResult
from fedmeta.common.meta.fedavg import local_sgd


def batch_size(work: SiteWork) -> int:
    """``fedavg.batch_size``, or by default as many rows as one meta-batch of tasks holds."""
    cfg = work.cfg
    if cfg.fedavg.batch_size:
        return cfg.fedavg.batch_size
    per_task = cfg.tasks.support + cfg.tasks.query
    return (cfg.tasks.ways if work.kind == "images" else cfg.tasks.meta_batch) * per_task


def site_step(work: SiteWork) -> StepResult:
    x, y = work.training_rows()
    generator = torch.Generator().manual_seed(int(work.rng.integers(2**31)))
    delta, stats = local_sgd(work.model, work.theta, x, y, steps=work.cfg.fedavg.local_steps,
                             lr=work.cfg.fedavg.lr, batch_size=batch_size(work),
                             generator=generator, loss="cross_entropy")
    return StepResult(delta, stats)


ALGORITHM = Algorithm(
    name="fedavg",
    title="FedAvg",
    paper="McMahan et al. 2017",
    update_kind="delta",
    site_step=site_step,
    head="all_classes",
    max_examples=lambda cfg, spec, n_train: n_train,
)
