"""One parse of a coordinator's request: the site's policy check and its computation see the same object.

A site reads a message exactly once, here, into a :class:`SiteRequest`. The policy gate
(:func:`fedmeta.sitecore.policy.check_request`) checks that object and the handler computes from
that same object; nothing downstream reads the message's records again. Two readers of one
message (one for the check, one for the work) is how a decoy record once bypassed the policy:
the check read the first record holding an experiment, the handler the one named ``config``.

So the parse is strict, and anything ambiguous is refused (:class:`RequestError`, reported as
"bad request") before the site touches its data:

- the records must be exactly those the message type carries (``config`` and, for TRAIN and
  EVALUATE, ``arrays``; on a secure-aggregation run Flower's legacy ``fitins.*`` records and the
  SecAgg+ stage record); no other record, of any kind, may ride along;
- the ``config`` entries must be exactly those of the phase, each of its type; the phase must be
  one the message type serves;
- the experiment is JSON without duplicate keys (a second ``"algorithm"`` would otherwise
  silently win) and validates as a whole :class:`~fedmeta.common.config.ExperimentConfig`;
- on a secure-aggregation run, the clipping bound and noise in the round config must equal the
  experiment's ``privacy`` settings: the site noises what the checked experiment says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common import MessageType

from fedmeta.common.config import ExperimentConfig, config_from_dict
from fedmeta.common.errors import ConfigError
from fedmeta.common.params import NDArrays
from fedmeta.protocol import keys as K
from fedmeta.protocol.records import arrays_from_record

#: Flower's legacy record names on a secure-aggregation run (``flwr.compat`` and SecAgg+).
FITINS_CONFIG = "fitins.config"
FITINS_PARAMETERS = "fitins.parameters"
SECAGG_STAGE = "secaggplus_configs"

_PHASES = {MessageType.QUERY: (K.HELLO, K.COUNTS), MessageType.TRAIN: (K.TRAIN, K.GLM),
           MessageType.EVALUATE: (K.EVALUATE,)}
_DOWN_MODES = ("full", "delta")
_MAX_EXPERIMENT = 8 << 20  # bytes of JSON: a MEDS vocabulary of many thousand codes fits


class RequestError(ConfigError):
    """A request is malformed or ambiguous; the message names the record or entry, never data."""


@dataclass(frozen=True)
class Downlink:
    """How the state in ``arrays`` is sent: in ``full``, or as a ``delta`` encoded with
    ``method`` on the θ whose checksum is ``base``."""

    mode: str = "full"
    method: str = ""
    base: str = ""


@dataclass(frozen=True)
class SecAggBounds:
    """A secure-aggregation round's bounds: the L2 clip of the delta, the noise multiplier of the
    released sum and how many sites share that noise."""

    l2_bound: float
    noise_multiplier: float
    n_sites: int


@dataclass(frozen=True)
class SiteRequest:
    """A parsed request. ``arrays`` is the state θ (fedmeta's packed record, or the legacy
    parameters on a secure-aggregation run); ``layout`` the coordinator's feature layout sent with
    the greeting; ``secagg`` the round's bounds on a secure-aggregation run."""

    message_type: str
    phase: str
    experiment: ExperimentConfig
    server_round: int = 0
    arrays: ArrayRecord | None = None
    downlink: Downlink = Downlink()
    layout: dict[str, Any] | None = None
    secagg: SecAggBounds | None = None
    message_id: str = ""

    @property
    def algorithm(self) -> str:
        return self.experiment.algorithm

    @cached_property
    def decoded(self) -> NDArrays:
        """``arrays`` decoded once (:func:`~fedmeta.protocol.records.arrays_from_record`, which
        checks it as untrusted input), so that the policy check and the handler read the same
        arrays; empty when the request carries none."""
        return arrays_from_record(self.arrays) if self.arrays is not None else {}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RequestError(f"the experiment names {key[:60]!r} twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise RequestError(f"the experiment holds {name}: not a number any setting may take")


def parse_experiment(text: object) -> ExperimentConfig:
    """The experiment of a request: JSON with no duplicate key, validated as a whole."""
    if not isinstance(text, str) or not text:
        raise RequestError(f"'{K.EXPERIMENT}' must be a non-empty string")
    if len(text) > _MAX_EXPERIMENT:
        raise RequestError(f"'{K.EXPERIMENT}' is {len(text)} bytes, more than {_MAX_EXPERIMENT}")
    try:
        values = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise RequestError(f"'{K.EXPERIMENT}' is not JSON ({e.msg} at {e.pos})") from None
    try:
        return config_from_dict(values, where="<experiment from coordinator>")
    except RequestError:
        raise
    except ConfigError as e:
        raise RequestError(str(e)) from e


def _records(message: Message, *, configs: set[str], arrays: set[str], required: set[str]) -> None:
    content = message.content
    present = {"config": set(content.config_records), "array": set(content.array_records),
               "metric": set(content.metric_records)}
    allowed = {"config": configs, "array": arrays, "metric": set()}
    for kind, names in present.items():
        extra = sorted(names - allowed[kind])
        if extra:
            raise RequestError(f"unexpected {kind} record {extra[0][:60]!r} in a "
                               f"{message.metadata.message_type} request")
    missing = sorted(required - present["config"] - present["array"])
    if missing:
        raise RequestError(f"the {message.metadata.message_type} request has no {missing[0]!r} record")


def _entries(record: ConfigRecord, *, name: str, allowed: set[str], required: set[str]) -> None:
    extra = sorted(set(record) - allowed)
    if extra:
        raise RequestError(f"unexpected entry {extra[0][:60]!r} in the {name!r} record")
    missing = sorted(required - set(record))
    if missing:
        raise RequestError(f"the {name!r} record has no {missing[0]!r} entry")


def _int(record: ConfigRecord, key: str, *, name: str) -> int:
    value = record.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RequestError(f"{name}.{key} must be a whole number >= 0")
    return value


def _str(record: ConfigRecord, key: str, *, name: str, default: str = "") -> str:
    value = record.get(key, default)
    if not isinstance(value, str):
        raise RequestError(f"{name}.{key} must be a string")
    return value


def _float(record: ConfigRecord, key: str, *, name: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{name}.{key} must be a number")
    return float(value)


def parse_request(message: Message, *, secure_aggregation: bool = False) -> SiteRequest | None:
    """Parse a request once. ``secure_aggregation``: the run's bundle names fedmeta's SecAgg+
    ClientApp, whose messages are Flower's legacy train records. Returns None only for a SecAgg+
    protocol step that carries no experiment (key setup, key sharing, unmasking): no data is
    read for those. Raises :class:`RequestError` for anything else that is not exactly a
    request of fedmeta's protocol."""
    if not message.has_content():
        raise RequestError("the request has no content")
    kind = message.metadata.message_type
    if secure_aggregation:
        return _parse_secagg(message)
    if kind not in _PHASES:
        raise RequestError(f"message type {kind[:40]!r} is not served")
    with_arrays = kind != MessageType.QUERY
    _records(message, configs={K.CONFIG}, arrays={K.ARRAYS} if with_arrays else set(),
             required={K.CONFIG, K.ARRAYS} if with_arrays else {K.CONFIG})
    config = message.content.config_records[K.CONFIG]
    phase = _str(config, K.PHASE, name=K.CONFIG)
    if phase not in _PHASES[kind]:
        raise RequestError(f"phase {phase[:40]!r} is not served by a {kind} request")
    base = {K.EXPERIMENT, K.PHASE}
    if phase == K.HELLO:
        _entries(config, name=K.CONFIG, allowed=base | {K.LAYOUT}, required=base)
    elif phase == K.COUNTS:
        _entries(config, name=K.CONFIG, allowed=base, required=base)
    else:
        down = {K.DOWN, K.DOWN_METHOD, K.DOWN_BASE} if phase == K.TRAIN else set()
        _entries(config, name=K.CONFIG, allowed=base | {K.ROUND} | down, required=base | {K.ROUND})
    downlink = Downlink()
    if K.DOWN in config:
        mode = _str(config, K.DOWN, name=K.CONFIG)
        if mode not in _DOWN_MODES:
            raise RequestError(f"{K.CONFIG}.{K.DOWN} must be one of {', '.join(_DOWN_MODES)}")
        coded = {K.DOWN_METHOD, K.DOWN_BASE}
        if mode == "delta" and not coded <= set(config):
            raise RequestError(f"a delta downlink needs {K.DOWN_METHOD} and {K.DOWN_BASE}")
        if mode == "full" and coded & set(config):
            raise RequestError(f"a full downlink carries no {K.DOWN_METHOD} or {K.DOWN_BASE}")
        downlink = Downlink(mode, _str(config, K.DOWN_METHOD, name=K.CONFIG),
                            _str(config, K.DOWN_BASE, name=K.CONFIG))
    layout = None
    if K.LAYOUT in config:
        try:
            layout = json.loads(_str(config, K.LAYOUT, name=K.CONFIG), object_pairs_hook=_no_duplicates)
        except json.JSONDecodeError:
            raise RequestError(f"{K.CONFIG}.{K.LAYOUT} is not JSON") from None
        if not isinstance(layout, dict):
            raise RequestError(f"{K.CONFIG}.{K.LAYOUT} is not a JSON object")
    return SiteRequest(
        message_type=kind, phase=phase, experiment=parse_experiment(config.get(K.EXPERIMENT)),
        server_round=_int(config, K.ROUND, name=K.CONFIG),
        arrays=message.content.array_records[K.ARRAYS] if with_arrays else None,
        downlink=downlink, layout=layout, message_id=message.metadata.message_id,
    )


def _parse_secagg(message: Message) -> SiteRequest | None:
    """A secure-aggregation run: every message is a SecAgg+ TRAIN step; only the step that
    collects the masked vectors carries the experiment and θ (Flower's legacy FitIns records)."""
    kind = message.metadata.message_type
    if kind != MessageType.TRAIN:
        raise RequestError(f"a secure-aggregation run serves only train requests, not {kind[:40]!r}")
    content = message.content
    _records(message, configs={SECAGG_STAGE, FITINS_CONFIG}, arrays={FITINS_PARAMETERS},
             required={SECAGG_STAGE})
    if FITINS_CONFIG not in content.config_records:
        if content.array_records:
            raise RequestError(f"parameters without {FITINS_CONFIG!r} in a secure-aggregation step")
        return None
    if FITINS_PARAMETERS not in content.array_records:
        raise RequestError(f"the secure-aggregation step has no {FITINS_PARAMETERS!r} record")
    config = content.config_records[FITINS_CONFIG]
    bounds = {K.SECAGG_L2_BOUND, K.SECAGG_NOISE, K.SECAGG_N_SITES}
    _entries(config, name=FITINS_CONFIG, allowed={K.EXPERIMENT, K.ROUND} | bounds,
             required={K.EXPERIMENT, K.ROUND} | bounds)
    cfg = parse_experiment(config.get(K.EXPERIMENT))
    secagg = SecAggBounds(l2_bound=_float(config, K.SECAGG_L2_BOUND, name=FITINS_CONFIG),
                          noise_multiplier=_float(config, K.SECAGG_NOISE, name=FITINS_CONFIG),
                          n_sites=_int(config, K.SECAGG_N_SITES, name=FITINS_CONFIG))
    noise = cfg.privacy.noise_multiplier if cfg.privacy.dp else 0.0
    if secagg.l2_bound != cfg.privacy.clip:
        raise RequestError(f"{K.SECAGG_L2_BOUND} = {secagg.l2_bound:g} contradicts the experiment's "
                           f"privacy.clip = {cfg.privacy.clip:g}")
    if secagg.noise_multiplier != noise:
        raise RequestError(f"{K.SECAGG_NOISE} = {secagg.noise_multiplier:g} contradicts the "
                           f"experiment's noise multiplier {noise:g}")
    if secagg.n_sites < 1:
        raise RequestError(f"{K.SECAGG_N_SITES} must be at least 1")
    return SiteRequest(
        message_type=kind, phase=K.TRAIN, experiment=cfg,
        server_round=_int(config, K.ROUND, name=FITINS_CONFIG),
        arrays=content.array_records[FITINS_PARAMETERS], secagg=secagg,
        message_id=message.metadata.message_id,
    )
