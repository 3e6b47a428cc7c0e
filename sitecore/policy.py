"""A hospital's own rules for what its node computes and sends, enforced at the site.

The policy lives in the site's node file (``node.yaml``, section ``policy``), owned by the
hospital; the coordinator can read it only by being refused. Every request is checked before any
patient row is touched (:func:`check_experiment`), and against the site's split sizes once its data
is loaded (:func:`check_sizes`). A breach raises :class:`PolicyRefusal`, whose message holds only
policy values and counts, so it may travel back to the coordinator as the refusal's reason.

The patient floor (``min_patients``) bounds how few patients can stand behind a number that leaves
the site: every task of a training round draws ``support + query`` distinct patients (``ways ×
(support + query)`` images), FedAvg trains on ``min(n_train, local_steps × batch)`` rows, and an
evaluation scores the whole test split after adapting on the training split (or on ``eval.shots``
patients), so each of these must reach the floor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, model_validator

from fedmeta.common import algorithms
from fedmeta.common.config import ExperimentConfig
from fedmeta.common.data.base import Site, TabularSite
from fedmeta.common.errors import ConfigError, PolicyRefusal
from fedmeta.common.yamlio import Bool, YamlModel, fail, integer, number
from fedmeta.protocol import keys as K
from fedmeta.protocol.request import SiteRequest

_GLM_NOT_DP = "this site requires differential privacy, and the federated GLM's sums carry no noise"


def _algorithm_names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise fail("expected a list of algorithm names")
    unknown = [v for v in value if v not in algorithms.names()]
    if unknown:
        raise fail(f"unknown algorithm {unknown[0]!r}; known: {', '.join(algorithms.names())}")
    return tuple(value)


def _all_algorithms() -> tuple[str, ...]:
    from fedmeta.common import algorithms

    return algorithms.names()


class SitePolicy(YamlModel):
    """What this hospital allows (defaults: the floor of 20 patients, every built-in algorithm,
    DP optional, at most 1000 rounds, secure aggregation allowed)."""

    min_patients: Annotated[int, integer(ge=1)] = 20
    algorithms: Annotated[tuple[str, ...], BeforeValidator(_algorithm_names)] = Field(
        default_factory=_all_algorithms)
    require_dp: Bool = False
    max_epsilon: Annotated[float, number(gt=0)] | None = None
    max_rounds: Annotated[int, integer(ge=1)] = 1000
    allow_secure_aggregation: Bool = True
    #: this site's splits: the coordinator cannot choose them (a test fraction raised by one
    #: patient's share adds exactly one patient to the test split: two evaluations then differ
    #: by that patient's outcome); an experiment asking for other splits is refused
    test_fraction: Annotated[float, number(gt=0, lt=1)] = 0.34
    split_seed: Annotated[int, integer(ge=0)] = 43
    validation_fractions: tuple[float, ...] = (0.25,)
    #: the federated GLM: may this site release its rows' summed gradient and Hessian, and at
    #: most how many coefficients per training row (DataSHIELD's ``nfilter.glm``, 0.33)
    allow_glm: Bool = True
    glm_parameter_ratio: Annotated[float, number(gt=0, le=1)] = 0.33
    #: the most any GLM coefficient sent may be (features are standardised at the site)
    glm_max_coefficient: Annotated[float, number(gt=0)] = 25.0
    #: δ of every ε this site accounts; a request with a larger privacy.delta is refused
    dp_delta: Annotated[float, number(gt=0, lt=1)] = 1e-5
    #: the most ε (at dp_delta) this site spends over all runs together, for as long as its state
    #: folder lives (sitecore/ledger.py): required with require_dp, never defaulted; privacy loss
    #: does not expire, so there is no period after which it starts again
    dp_epsilon_budget: Annotated[float, number(gt=0)] | None = None
    #: resource ceilings: the most one request may make this site compute
    max_inner_steps: Annotated[int, integer(ge=1)] = 100   # inner.steps, fedavg.local_steps
    max_adapt_steps: Annotated[int, integer(ge=0)] = 1000  # eval.adapt_steps
    max_tasks: Annotated[int, integer(ge=1)] = 256          # tasks.meta_batch x tasks.meta_batches
    max_parameters: Annotated[int, integer(ge=1)] = 2_000_000
    max_bootstrap: Annotated[int, integer(ge=0)] = 2000     # eval.bootstrap
    max_draws: Annotated[int, integer(ge=1)] = 50           # eval.draws
    max_threads: Annotated[int, integer(ge=1)] = 4          # engine.threads
    max_cv_fits: Annotated[int, integer(ge=1)] = 30         # eval.folds x eval.repeats
    #: the most wall time one request may take here: past it the worker stops computing (at the
    #: next check of its loops, fedmeta.common.deadline) and answers "request timeout"; the
    #: coordinator waits at most federation.eval_timeout_s (900 s) for an evaluation anyway
    max_request_seconds: Annotated[float, number(gt=0)] = 900.0
    #: the disclosure budget (sitecore/ledger.py), kept across runs in the site's state folder;
    #: algorithm auto evaluates each candidate on validation rows (about 25 evaluations a run)
    max_evaluations_per_run: Annotated[int, integer(ge=1)] = 40
    max_train_requests_per_run: Annotated[int, integer(ge=1)] = 2000
    max_requests_per_day: Annotated[int, integer(ge=1)] = 20000

    @model_validator(mode="after")
    def _dp_needs_a_ceiling(self) -> SitePolicy:
        if self.require_dp and self.max_epsilon is None:
            raise ValueError("require_dp needs max_epsilon: without a ceiling any noise, even none, "
                             "would satisfy it")
        if self.require_dp and self.dp_epsilon_budget is None:
            raise ValueError("require_dp needs dp_epsilon_budget: max_epsilon holds per run, and runs "
                             "are unlimited")
        if self.dp_epsilon_budget is not None and not self.require_dp:
            raise ValueError("dp_epsilon_budget needs require_dp: true: a run without DP would spend "
                             "nothing against it")
        return self


def check_experiment(policy: SitePolicy, cfg: ExperimentConfig, *, secure_aggregation: bool = False) -> None:
    """Refuse an experiment this site does not allow, before any of its data is read."""
    if cfg.algorithm not in policy.algorithms:
        raise PolicyRefusal(f"algorithm {cfg.algorithm!r} is not allowed here "
                            f"(allowed: {', '.join(policy.algorithms)})")
    if cfg.rounds > policy.max_rounds:
        raise PolicyRefusal(f"rounds = {cfg.rounds} exceeds this site's max_rounds = {policy.max_rounds}")
    if secure_aggregation and not policy.allow_secure_aggregation:
        raise PolicyRefusal("secure aggregation runs are not allowed here")
    check_splits(policy, cfg)
    if cfg.privacy.dp or policy.require_dp:
        check_privacy(policy, cfg)
    if policy.require_dp and cfg.algorithm == "glm":
        raise PolicyRefusal(_GLM_NOT_DP)
    check_resources(policy, cfg)
    floor = policy.min_patients
    if 0 < cfg.eval.shots < floor:
        raise PolicyRefusal(f"eval.shots = {cfg.eval.shots} is below this site's min_patients = {floor}")


def check_splits(policy: SitePolicy, cfg: ExperimentConfig) -> None:
    """The site's own split settings, not the coordinator's: nested splits of the coordinator's
    choosing let two releases differ by one patient."""
    d = cfg.data
    if d.test_fraction != policy.test_fraction or d.split_seed != policy.split_seed:
        raise PolicyRefusal(f"data.test_fraction = {d.test_fraction:g} and data.split_seed = {d.split_seed} "
                            f"are not this site's splits ({policy.test_fraction:g}, {policy.split_seed})")
    if d.score_on == "validation" and d.validation_fraction not in policy.validation_fractions:
        raise PolicyRefusal(f"data.validation_fraction = {d.validation_fraction:g} is not one of this "
                            f"site's ({', '.join(f'{v:g}' for v in policy.validation_fractions)})")


def check_privacy(policy: SitePolicy, cfg: ExperimentConfig) -> None:
    """DP that means what it says: noise that is there, δ no larger than the site's, and ε at the
    site's δ within its ceiling."""
    p = cfg.privacy
    if policy.require_dp and not p.dp:
        raise PolicyRefusal("this site requires differential privacy (privacy.dp = true)")
    if not p.noise_multiplier > 0:
        raise PolicyRefusal("privacy.noise_multiplier = 0 adds no noise: not differential privacy")
    if p.delta > policy.dp_delta:
        raise PolicyRefusal(f"privacy.delta = {p.delta:g} exceeds this site's dp_delta = {policy.dp_delta:g}")
    if policy.max_epsilon is not None:
        from fedmeta.common.privacy import epsilon

        eps = epsilon(rounds=cfg.rounds, noise_multiplier=p.noise_multiplier, delta=policy.dp_delta)
        if eps > policy.max_epsilon:
            raise PolicyRefusal(f"the run's ε = {eps:.3g} after {cfg.rounds} rounds (at δ = "
                                f"{policy.dp_delta:g}) exceeds this site's max_epsilon = {policy.max_epsilon:g}")


def check_resources(policy: SitePolicy, cfg: ExperimentConfig) -> None:
    """Refuse a request that would make the site compute more than its ceilings allow."""
    limits = [
        ("inner.steps", cfg.inner.steps, policy.max_inner_steps, "max_inner_steps"),
        ("fedavg.local_steps", cfg.fedavg.local_steps, policy.max_inner_steps, "max_inner_steps"),
        ("eval.adapt_steps", cfg.eval.adapt_steps, policy.max_adapt_steps, "max_adapt_steps"),
        ("tasks.meta_batch x tasks.meta_batches", cfg.tasks.meta_batch * cfg.tasks.meta_batches,
         policy.max_tasks, "max_tasks"),
        ("eval.bootstrap", cfg.eval.bootstrap, policy.max_bootstrap, "max_bootstrap"),
        ("eval.draws", cfg.eval.draws, policy.max_draws, "max_draws"),
        ("engine.threads", cfg.engine.threads, policy.max_threads, "max_threads"),
        ("eval.folds x eval.repeats", cfg.eval.folds * cfg.eval.repeats, policy.max_cv_fits, "max_cv_fits"),
    ]
    for what, value, limit, name in limits:
        if value > limit:
            raise PolicyRefusal(f"{what} = {value} exceeds this site's {name} = {limit}")


def parameter_count(cfg: ExperimentConfig, n_features: int, n_classes: int = 2) -> int:
    """The parameters of the table model ``cfg`` trains (its algorithm's own network included:
    a Relation Network's relation module), counted on PyTorch's ``meta`` device, where tensors
    have shapes and no storage: a hostile width must not allocate anything."""
    import torch

    from fedmeta.common.data.registry import DataSpec
    from fedmeta.common.models import ModelSpec

    spec = ModelSpec.for_experiment(cfg, DataSpec("tabular", (n_features,), n_classes, ("outcome",)))
    with torch.device("meta"):
        return sum(p.numel() for p in spec.build().parameters())


def check_sizes(policy: SitePolicy, cfg: ExperimentConfig, site: Site, *, phase: str) -> None:
    """Refuse a round whose numbers would rest on fewer patients than the floor."""
    floor = policy.min_patients
    if isinstance(site, TabularSite):
        params = parameter_count(cfg, site.n_features, site.n_classes)
        if params > policy.max_parameters:
            raise PolicyRefusal(f"the model has {params} parameters, more than this site's "
                                f"max_parameters = {policy.max_parameters}")
    if phase == "train":
        kind = "tabular" if isinstance(site, TabularSite) else "images"
        n, words = algorithms.get(cfg.algorithm).round_patients(cfg, kind, site.n_train)
        if n < floor:
            raise PolicyRefusal(f"{words.format(n=n)}, below this site's min_patients = {floor}")
    if site.n_train < floor:
        raise PolicyRefusal(f"the training split has {site.n_train} patients, below this site's "
                            f"min_patients = {floor}")
    if phase == "evaluate" and site.n_test < floor:
        raise PolicyRefusal(f"the test split would hold {site.n_test} patients, below this "
                            f"site's min_patients = {floor}")


def check_agreement(policy: SitePolicy, cfg: ExperimentConfig) -> None:
    """Refuse, before the feature agreement reads any data, a run whose training rounds this site
    would refuse anyway (tables: the sizes :func:`check_sizes` checks that need no data). The
    counts themselves are thresholded at k >= ``min_patients`` by the site (its node config)."""
    floor = policy.min_patients
    n, words = algorithms.get(cfg.algorithm).round_patients(cfg, "tabular", None)
    if n < floor:
        raise PolicyRefusal(f"{words.format(n=n)}, below this site's min_patients = {floor}")


def check_request(policy: SitePolicy, request: SiteRequest, *, site: Callable[[], Site],
                  secure_aggregation: bool = False, secagg_threshold: int | None = None,
                  before_data: Callable[[], None] | None = None) -> None:
    """The site's gate: check the parsed request that the handler will then compute from.

    ``site`` loads the site's data (called only when the experiment itself passed, and never for
    the feature agreement, which runs before the site is tabularised). ``before_data`` runs once
    the experiment passed and before any data is read (the site's ε ledger: a run that would
    overspend is refused there). ``secagg_threshold`` is
    the SecAgg+ reconstruction threshold this node was set up with: the noise of a secure round
    is shared by that many sites, so a round claiming more sharers (and so adding less noise per
    site) is refused.
    """
    cfg = request.experiment
    check_experiment(policy, cfg, secure_aggregation=secure_aggregation)
    if request.phase == K.GLM and policy.require_dp:
        raise PolicyRefusal(_GLM_NOT_DP)
    if before_data is not None:
        before_data()
    if request.phase == K.COUNTS:
        check_agreement(policy, cfg)
        return
    if request.secagg is not None and request.secagg.n_sites != secagg_threshold:
        raise PolicyRefusal(f"the secure round's noise is claimed to be shared by "
                            f"{request.secagg.n_sites} sites, but this node was set up with a "
                            f"reconstruction threshold of {secagg_threshold}")
    loaded = site()
    if request.phase == K.HELLO:  # the greeting: decline the whole run up front
        check_sizes(policy, cfg, loaded, phase="train")
        check_sizes(policy, cfg, loaded, phase="evaluate")
    elif request.phase == K.GLM:
        check_glm(policy, loaded, request)
    else:
        check_sizes(policy, cfg, loaded, phase="train" if request.phase == K.TRAIN else "evaluate")


def check_glm(policy: SitePolicy, site: Site, request: SiteRequest | None = None) -> None:
    """Refuse a GLM step this site does not allow, whose sums would rest on too few rows, or whose
    coefficients make them rest on a few: the coordinator chooses β, and a steep β weighs every
    row but those near a threshold by almost nothing, so two such sums differ by one patient's
    row. The Hessian's row weights ``p(1 − p)`` must have an effective count
    ``(Σ w)² / Σ w²`` of at least ``min_patients``, every coefficient is bounded by
    ``glm_max_coefficient``, and a coefficient that is not a finite number is refused."""
    import numpy as np

    if not policy.allow_glm:
        raise PolicyRefusal("the federated GLM's gradient and Hessian sums are not released here")
    if not isinstance(site, TabularSite):
        raise PolicyRefusal("the federated GLM fits tables; this site holds images")
    labelled = site.y_train[:, 0] >= 0
    n = int(labelled.sum())
    if n < policy.min_patients:
        raise PolicyRefusal(f"the GLM's sums would rest on {n} patients, below this site's "
                            f"min_patients = {policy.min_patients}")
    params = site.n_features + 1
    if params > policy.glm_parameter_ratio * n:
        raise PolicyRefusal(f"the GLM has {params} coefficients for {n} patients, more than "
                            f"this site's glm_parameter_ratio = {policy.glm_parameter_ratio:g} per patient")
    if request is None:
        return
    beta = request.decoded.get("beta")
    if beta is None or np.shape(beta) != (params,):
        return  # the handler refuses it as a bad request
    beta = np.asarray(beta, dtype=np.float64)
    if not np.all(np.isfinite(beta)):
        raise PolicyRefusal("a GLM coefficient is not a finite number")
    if np.max(np.abs(beta)) > policy.glm_max_coefficient:
        raise PolicyRefusal(f"a GLM coefficient of {np.max(np.abs(beta)):.3g} exceeds this site's "
                            f"glm_max_coefficient = {policy.glm_max_coefficient:g}")
    z = site.x_train[labelled].astype(np.float64) @ beta[:-1] + beta[-1]
    p = 1.0 / (1.0 + np.exp(-z))
    w = p * (1.0 - p)
    effective = float(w.sum() ** 2 / max(float((w ** 2).sum()), 1e-300))
    if effective < policy.min_patients:
        raise PolicyRefusal(f"these GLM coefficients weigh the sums on about {effective:.0f} patients, "
                            f"below this site's min_patients = {policy.min_patients}")


def patient_floor(node_config: Mapping[str, object]) -> int:
    """The floor under every number this node releases: the ``min-patients`` entry the site
    worker sets from its policy on every deployed request, and fedmeta's simulation sets to
    :data:`~fedmeta.protocol.keys.SIMULATED_FLOOR` for its nodes. One reader, so that the key cannot drift between the
    worker and a handler; a missing or malformed value is an error, never a lower floor (a node
    that runs fedmeta's ClientApp without the site worker releases nothing)."""
    value = node_config.get(K.MIN_PATIENTS)
    if value is None:
        raise ConfigError(f"node config has no {K.MIN_PATIENTS}: a deployed site's worker sets it from "
                          "its policy and fedmeta's simulation for its nodes; without it nothing is released")
    try:
        floor = int(str(value))
    except ValueError:
        raise ConfigError(f"node config {K.MIN_PATIENTS} = {str(value)[:40]!r}: not a whole number") from None
    if floor < 1:
        raise ConfigError(f"node config {K.MIN_PATIENTS} = {floor}: must be at least 1")
    return floor
