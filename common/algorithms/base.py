"""What an algorithm is in fedmeta: one record, read by both sides of the federation.

An :class:`Algorithm` says

- what a site computes in one round (``site_step``: its inner loop and what it returns, from
  tasks the site draws from its own data),
- what kind of update that is (``update_kind``: a parameter delta ``θ_i − θ`` or a
  meta-gradient) and so which direction the coordinator's outer optimiser receives
  (``direction``: ``−Δ̄`` for deltas, ``ḡ`` for gradients, unless the record says otherwise),
- the extra state the coordinator learns and broadcasts besides θ (``extra_state``: Meta-SGD's
  per-parameter rates, named ``<extra_prefix><param>`` on the wire),
- how a site scores the learned state (``evaluation``: fine-tuning, the learned rates, or a
  metric learner's classifier built from the site's support set: ``metric``), and how many
  examples one round's reply may claim (``max_examples``);
- the network it trains, when it is not the configured one as it stands (``model``: a Relation
  Network wraps the configured embedding with a relation module).

Adding an algorithm is one new module defining such a record plus one line in
:mod:`fedmeta.common.algorithms.registry` (or :func:`~fedmeta.common.algorithms.registry.register`
at run time). Nothing here imports Flower.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from fedmeta.common.errors import DataError
from fedmeta.common.meta.episodic import MetricHead
from fedmeta.common.meta.types import InnerConfig, MetaStats, Params, TaskBatch
from fedmeta.common.params import NDArrays

if TYPE_CHECKING:
    from fedmeta.common.config import ExperimentConfig
    from fedmeta.common.data.registry import DataSpec
    from fedmeta.common.models import ModelSpec

UpdateKind = Literal["delta", "gradient"]
Evaluation = Literal["finetune", "learned_rates", "support"]


@dataclass(frozen=True)
class SiteWork:
    """Everything a site hands its algorithm's training step; all of it stays at the site.

    ``theta``/``extra`` are the broadcast state split into θ and the algorithm's extra state
    (names without the prefix), on ``device``. ``draw_tasks()`` returns one meta-batch of the
    site's training tasks on ``device`` (each call draws from ``rng``); ``training_rows()`` all
    labelled training rows ``(x, y)`` on ``device``. ``kind`` is the data's (tables or
    images); ``n_way`` is the number of classes per task;
    ``class_counts`` the training labels' counts per class (first outcome for tables).
    """

    cfg: ExperimentConfig
    model: nn.Module
    theta: Params
    extra: Params
    inner: InnerConfig
    draw_tasks: Callable[[], TaskBatch]
    training_rows: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    impl: str
    kind: Literal["tabular", "images"]
    n_way: int
    class_counts: Mapping[int, int]
    rng: np.random.Generator
    device: torch.device
    site: str = "site"
    outcome: str = ""
    #: ``torch.compile`` the step's gradient (vmap path) and compute θ's query loss before
    #: adaptation (a statistic only): ``cfg.engine.compile`` / ``cfg.engine.before_stats``
    compile: bool = False
    before_stats: bool = False

    def engine_options(self) -> dict[str, Any]:
        """The keyword arguments every ``fedmeta.common.meta`` step takes from the engine config."""
        return {"impl": self.impl, "compile": self.compile, "before_stats": self.before_stats}


@dataclass(frozen=True)
class StepResult:
    """One round's result at a site: a θ-shaped update, the extra state's update (same names as
    ``SiteWork.extra``; empty when the algorithm has none) and sums/counts of the work done."""

    update: Params
    stats: MetaStats
    extra_update: Params = field(default_factory=dict)


def mean_of(total: Params, n: int) -> Params:
    """``total / n`` key by key (the mean of ``n`` summed meta-gradients)."""
    return {k: v / n for k, v in total.items()}


def add_into(total: Params | None, part: Params) -> Params:
    """``total + part`` key by key (``part`` when ``total`` is None)."""
    return dict(part) if total is None else {k: total[k] + part[k] for k in part}


#: One meta-batch's meta-gradients: (∂L/∂θ, ∂L/∂extra (empty if none), sums and counts).
MetaGradient = tuple[Params, Params, MetaStats]


def averaged_meta_gradient(work: SiteWork, step: Callable[[TaskBatch], MetaGradient]) -> StepResult:
    """Draw ``tasks.meta_batches`` meta-batches, take ``step`` on each and return the mean of
    their meta-gradients (θ and extra state) with the summed statistics."""
    grads: Params | None = None
    extra: Params | None = None
    total: MetaStats | None = None
    n = work.cfg.tasks.meta_batches
    for _ in range(n):
        g, g_extra, stats = step(work.draw_tasks())
        grads = add_into(grads, g)
        extra = add_into(extra, g_extra)
        total = stats if total is None else total + stats
    assert grads is not None and extra is not None and total is not None
    return StepResult(mean_of(grads, n), total, extra_update=mean_of(extra, n))


def metric_site_step(metric: MetricHead) -> Callable[[SiteWork], StepResult]:
    """The site step of a metric learner (``metric``): the gradient of its episodes' query loss
    with respect to θ, averaged over the site's meta-batches. Binary tables: both classes must
    be in the training split (an episode needs a support patient of each)."""

    def site_step(work: SiteWork) -> StepResult:
        missing = [c for c in range(work.n_way) if not work.class_counts.get(c, 0)]
        if missing and work.n_way == 2:
            raise DataError(
                f"site {work.site}: {metric.name} episodes need both classes, but the training split has "
                f"no patient with outcome {work.outcome} = {missing[0]}; this site can only be scored"
            )

        def step(tasks: TaskBatch) -> MetaGradient:
            g, stats = metric.step(work.model, work.theta, tasks, n_way=work.n_way, **work.engine_options())
            return g, {}, stats

        return averaged_meta_gradient(work, step)

    return site_step


def _no_extra(theta: NDArrays, cfg: ExperimentConfig) -> NDArrays:
    return {}


def _no_summary(extra: NDArrays) -> dict[str, object]:
    return {}


def tasks_examples(cfg: ExperimentConfig, spec: DataSpec) -> int:
    """Examples a site's ``tasks.meta_batches`` meta-batches hold: every support and query
    example of every task (episodes: ``ways`` classes each)."""
    t = cfg.tasks
    per_task = t.support + t.query
    if spec.kind == "images":
        per_task *= t.ways
    return t.meta_batches * t.meta_batch * per_task


def task_patients(cfg: ExperimentConfig, kind: str, n_train: int | None) -> tuple[int, str]:
    """The fewest patients (images) one of a round's released numbers rests on, for an algorithm
    that trains on tasks: one task's support and query patients (tables) or one episode's
    ``ways`` classes of support and query images, with the words a refusal names it by."""
    t = cfg.tasks
    if kind == "images":
        return t.ways * (t.support + t.query), "an episode of {n} images"
    return t.support + t.query, "a task of support + query = {n} patients"


@dataclass(frozen=True)
class Algorithm:
    """One meta-learning (or baseline) algorithm, as both sides of the federation see it."""

    name: str
    title: str
    paper: str
    update_kind: UpdateKind
    site_step: Callable[[SiteWork], StepResult]
    evaluation: Evaluation = "finetune"
    first_order: bool = False
    #: Image models' outputs: ``ways`` (episodes relabel their classes) or ``all_classes`` (a
    #: plain classifier over every meta-training class, fine-tuned per episode).
    head: Literal["ways", "all_classes"] = "ways"
    extra_prefix: str = ""
    extra_state: Callable[[NDArrays, ExperimentConfig], NDArrays] = _no_extra
    summary: Callable[[NDArrays], dict[str, object]] = _no_summary
    #: Most examples one round's reply may claim: (config, data spec, the n_train the site
    #: declared at the handshake) -> count. A larger claim is rejected by the coordinator.
    max_examples: Callable[[ExperimentConfig, DataSpec, int], int] = (
        lambda cfg, spec, n_train: tasks_examples(cfg, spec)
    )
    #: ``(config, data kind, the site's n_train or None before its data is read) -> (patients,
    #: words)``: the fewest patients one of a round's released numbers rests on, which a site's
    #: policy holds to its ``min_patients`` (:func:`task_patients` unless the record says).
    round_patients: Callable[[ExperimentConfig, str, int | None], tuple[int, str]] = task_patients
    #: Why secure aggregation (SecAgg+, where the coordinator sees only the weighted mean of the
    #: sites' updates) cannot carry it; empty: it can.
    secure_aggregation: str = ""
    #: How the coordinator drives it: ``rounds`` of ``site_step`` and an outer update, or
    #: ``newton`` steps on the sites' summed gradients and Hessians (the federated GLM).
    procedure: Literal["rounds", "newton"] = "rounds"
    #: A metric learner's classifier (``evaluation == "support"``): what it keeps of a support
    #: set and how it scores queries against it, for evaluation, ``adapt`` and the bundle.
    metric: MetricHead | None = None
    #: ``(the configured network, config, data spec) -> the network this algorithm trains``;
    #: None: the configured one.
    model: Callable[[ModelSpec, ExperimentConfig, DataSpec], ModelSpec] | None = None

    def __post_init__(self) -> None:
        if self.update_kind not in ("delta", "gradient"):
            raise ValueError(f"algorithm {self.name}: update_kind {self.update_kind!r}")
        if self.extra_state is not _no_extra and not self.extra_prefix:
            raise ValueError(f"algorithm {self.name}: extra state needs an extra_prefix")
        if (self.evaluation == "support") != (self.metric is not None):
            raise ValueError(f"algorithm {self.name}: evaluation 'support' and a metric go together")
        if not self.secure_aggregation and (self.extra_prefix or self.procedure != "rounds"):
            raise ValueError(f"algorithm {self.name}: secure aggregation carries the mean update of "
                             "θ alone; say why it cannot carry this one (secure_aggregation)")

    # -- the broadcast state: θ plus the extra state, one flat dict on the wire -------------------
    def initial_state(self, theta: NDArrays, cfg: ExperimentConfig) -> NDArrays:
        """θ₀ plus the extra state the coordinator starts from (prefixed names)."""
        return self.join(theta, self.extra_state(theta, cfg))

    def join(self, theta: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray]) -> NDArrays:
        out = dict(theta)
        out.update({f"{self.extra_prefix}{k}": v for k, v in extra.items()})
        return out

    def split(self, state: Mapping[str, np.ndarray]) -> tuple[NDArrays, NDArrays]:
        """The broadcast state as ``(θ, extra)``; extra names lose the prefix."""
        if not self.extra_prefix:
            return dict(state), {}
        p = self.extra_prefix
        theta = {k: v for k, v in state.items() if not k.startswith(p)}
        extra = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
        return theta, extra

    def direction(self, aggregated: Mapping[str, np.ndarray]) -> NDArrays:
        """The outer optimiser's pseudo-gradient: ``−Δ̄`` for deltas (so SGD with ``lr = β`` is
        ``θ + βΔ̄``), the aggregate itself for gradients."""
        if self.update_kind == "delta":
            return {k: -v for k, v in aggregated.items()}
        return dict(aggregated)
