"""FedAvg with local fine-tuning: the baseline fedmeta is measured against.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data"): a site runs ``fedavg.local_steps`` minibatch SGD steps of size
``fedavg.lr`` on its own training rows from θ and returns ``Δ_i``; the coordinator applies
``θ ← θ + η Σ_i w_i Δ_i / Σ_i w_i``. Sites then score θ after local fine-tuning, as FLamby's
"FedAvg + local fine-tuning" (Ogier du Terrail et al. 2022). The weight of a reply is the site's
training rows, so it may not claim more than the site declared at the handshake.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedmeta.common.algorithms.base import Algorithm, SiteWork, StepResult
from fedmeta.common.meta.fedavg import local_sgd

if TYPE_CHECKING:
    from fedmeta.common.config import ExperimentConfig


def batch_size(cfg: ExperimentConfig, kind: str) -> int:
    """``fedavg.batch_size``, or by default as many rows as one meta-batch of tasks holds (one
    episode's images)."""
    if cfg.fedavg.batch_size:
        return cfg.fedavg.batch_size
    per_task = cfg.tasks.support + cfg.tasks.query
    return (cfg.tasks.ways if kind == "images" else cfg.tasks.meta_batch) * per_task


def round_patients(cfg: ExperimentConfig, kind: str, n_train: int | None) -> tuple[int, str]:
    """The rows one round's local SGD uses: ``local_steps`` batches, at most the training split."""
    rows = cfg.fedavg.local_steps * batch_size(cfg, kind)
    return (rows if n_train is None else min(n_train, rows)), "a FedAvg round would use {n} patients"


def site_step(work: SiteWork) -> StepResult:
    x, y = work.training_rows()
    generator = torch.Generator().manual_seed(int(work.rng.integers(2**31)))
    delta, stats = local_sgd(work.model, work.theta, x, y, steps=work.cfg.fedavg.local_steps,
                             lr=work.cfg.fedavg.lr, batch_size=batch_size(work.cfg, work.kind),
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
    round_patients=round_patients,
    secure_aggregation="a FedAvg reply is weighted by the site's training rows, which SecAgg+'s "
                       "bounded weight cannot carry",
)
