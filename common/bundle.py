"""The site model bundle: one pickle-free file a hospital can apply to tomorrow's patients.

A bundle is a safetensors file. Its tensors are the network's weights (``param/<name>``) and, for
a metric learner, what its classifier keeps of the site's support set (``head/<name>``: the
class prototypes of a Prototypical Network, the embedded support patients and their labels of a
Matching Network, the class features of a Relation Network; they *are* the classifier). Its
metadata key ``fedmeta_bundle`` holds one JSON document:

- ``format`` / ``format_version``: ``fedmeta-site-model``, :data:`FORMAT_VERSION`;
- ``model``: the registry name and keyword arguments that rebuild the network
  (:func:`fedmeta.common.models.build_model`); ``head``: ``logits``, or the name of the metric
  learner whose classifier the ``head/`` tensors are (``protonet``, ``matching``, ``relation``;
  format 1 wrote ``prototypes`` for ``protonet``);
- ``preprocessing``: the fitted preprocessing (:mod:`fedmeta.common.preprocessing`);
- ``outcome``, ``classes``, ``id_column``;
- ``calibration`` (``risk = σ(a + b·s)`` of the positive-class logit ``s``) and ``threshold``
  (value, policy and what it achieved where it was chosen), binary outcomes only;
- ``provenance``: source run and its config hash, contributing sites, fedmeta and torch
  versions, number of labelled patients and their class counts, creation time;
- ``adaptation``: the adaptation policy's choice and cross-validation table;
- ``metrics``: optional test metrics for the model card;
- ``weights_sha256``: a digest of the tensors, checked on load.

Loading never runs code (no pickle); a file that is not a bundle, or was written by a newer
fedmeta, is refused with :class:`BundleError`.

Example::

    >>> from fedmeta.common.bundle import load_site_model          # doctest: +SKIP
    >>> model = load_site_model("hospital.fedmeta")                # doctest: +SKIP
    >>> risks = model.predict_proba(pandas.read_csv("new.csv"))    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call

from fedmeta.common.adaptation import (
    AdaptationResult,
    SupportHead,
    positive_logit,
)
from fedmeta.common.clinical.calibration import Calibration
from fedmeta.common.clinical.thresholds import Threshold
from fedmeta.common.errors import DataError, FedmetaError
from fedmeta.common.extras import installed_version
from fedmeta.common.meta.episodic import MetricHead
from fedmeta.common.models import ModelSpec
from fedmeta.common.preprocessing import (
    EhrPreprocessing,
    HeartPreprocessing,
    ImagePreprocessing,
    Preprocessing,
    preprocessing_from_dict,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

FORMAT = "fedmeta-site-model"
#: 2: ``head`` names the metric learner and its ``head/`` tensors are whatever it keeps (1 knew
#: ProtoNets alone, as ``prototypes``).
FORMAT_VERSION = 2
V1_HEADS = {"prototypes": "protonet"}
META_KEY = "fedmeta_bundle"
SUFFIX = ".fedmeta"


class BundleError(FedmetaError, ValueError):
    """A file is not a readable fedmeta site-model bundle (or is from a newer fedmeta)."""



def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def config_hash(config_json: str) -> str:
    """SHA-256 of the experiment configuration's canonical JSON (sorted keys)."""
    canonical = json.dumps(json.loads(config_json), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Provenance:
    """Where a bundle came from. ``class_counts`` maps class name to labelled patients."""

    site: str
    source_run: str
    config_hash: str
    algorithm: str
    contributing_sites: tuple[str, ...]
    n_labelled: int
    class_counts: Mapping[str, int]
    fedmeta_version: str = field(default_factory=installed_version)
    torch_version: str = torch.__version__
    created: str = field(default_factory=_now)

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "source_run": self.source_run, "config_hash": self.config_hash,
                "algorithm": self.algorithm, "contributing_sites": list(self.contributing_sites),
                "n_labelled": self.n_labelled, "class_counts": dict(self.class_counts),
                "fedmeta_version": self.fedmeta_version, "torch_version": self.torch_version,
                "created": self.created}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Provenance:
        return cls(str(d["site"]), str(d["source_run"]), str(d["config_hash"]), str(d["algorithm"]),
                   tuple(d["contributing_sites"]), int(d["n_labelled"]),
                   {str(k): int(v) for k, v in d["class_counts"].items()},
                   str(d["fedmeta_version"]), str(d["torch_version"]), str(d["created"]))


def _digest(tensors: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k])
        h.update(k.encode() + b"\0" + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class SiteModelBundle:
    """Everything needed to score new patients at one site (module docstring)."""

    model: ModelSpec
    params: Mapping[str, np.ndarray]
    preprocessing: Preprocessing
    outcome: str
    classes: tuple[str, ...]
    provenance: Provenance
    head: str = "logits"
    memory: Mapping[str, np.ndarray] = field(default_factory=dict)
    calibration: Calibration = field(default_factory=Calibration)
    threshold: Threshold | None = None
    adaptation: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] | None = None
    id_column: str | None = None

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise ValueError(f"a bundle needs at least 2 classes, got {self.classes}")
        if self.head != "logits":
            keeps = sorted(_metric(self.head).keeps)
            if sorted(self.memory) != keeps:
                raise ValueError(f"a {self.head} head keeps {keeps} of the support set, the bundle has "
                                 f"{sorted(self.memory)}")
        elif self.memory:
            raise ValueError("a logits head keeps nothing of the support set")
        if self.binary and self.threshold is None:
            raise ValueError("a binary bundle needs a decision threshold")

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def from_adaptation(cls, model_spec: ModelSpec, params: Mapping[str, torch.Tensor] | None,
                        preprocessing: Preprocessing, outcome: str, adaptation_result: AdaptationResult,
                        provenance: Provenance, *, id_column: str | None = None,
                        metrics: Mapping[str, Any] | None = None) -> SiteModelBundle:
        """A binary bundle from :func:`~fedmeta.common.adaptation.adapt_with_policy`'s result
        (``params`` defaults to its adapted parameters)."""
        p = adaptation_result.params if params is None else params
        counts = adaptation_result.class_counts
        prov = replace(provenance, n_labelled=adaptation_result.n,
                       class_counts={"0": counts[0], "1": counts[1]})
        return cls(model_spec, _to_numpy(p), preprocessing, outcome, ("0", "1"), prov,
                   calibration=adaptation_result.calibration, threshold=adaptation_result.threshold,
                   adaptation=adaptation_result.summary(), metrics=metrics, id_column=id_column)

    @classmethod
    def from_support(cls, model_spec: ModelSpec, params: Mapping[str, torch.Tensor], preprocessing: Preprocessing,
                     outcome: str, algorithm: str, head: SupportHead, provenance: Provenance, *,
                     classes: Sequence[str] | None = None, id_column: str | None = None,
                     metrics: Mapping[str, Any] | None = None) -> SiteModelBundle:
        """A metric learner's bundle (``algorithm``: its name): the network and what its
        classifier keeps of the support set."""
        names = tuple(classes) if classes is not None else tuple(str(i) for i in range(len(head.class_counts)))
        prov = replace(provenance, n_labelled=int(sum(head.class_counts)),
                       class_counts={c: int(k) for c, k in zip(names, head.class_counts, strict=True)})
        return cls(model_spec, _to_numpy(params), preprocessing, outcome, names, prov, head=algorithm,
                   memory=_to_numpy(head.memory), calibration=head.calibration, threshold=head.threshold,
                   adaptation={"choice": {"scope": "support", "text": head.metric.text},
                               "warnings": list(head.warnings)},
                   metrics=metrics, id_column=id_column)

    # -- file ------------------------------------------------------------------------------
    def tensors(self) -> dict[str, np.ndarray]:
        out = {f"param/{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in self.params.items()}
        out.update({f"head/{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in self.memory.items()})
        return out

    def document(self) -> dict[str, Any]:
        """The JSON metadata (everything but the tensors)."""
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "model": self.model.to_dict(), "head": self.head,
            "preprocessing": self.preprocessing.to_dict(),
            "outcome": self.outcome, "classes": list(self.classes), "id_column": self.id_column,
            "calibration": self.calibration.to_dict(),
            "threshold": self.threshold.to_dict() if self.threshold else None,
            "provenance": self.provenance.to_dict(), "adaptation": _json_ready(self.adaptation),
            "metrics": _json_ready(self.metrics) if self.metrics is not None else None,
            "weights_sha256": _digest(self.tensors()),
        }

    def save(self, path: str | Path) -> Path:
        """Write the bundle atomically (temp file, then rename); returns the path."""
        from safetensors.numpy import save_file

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        save_file(self.tensors(), str(tmp), metadata={META_KEY: json.dumps(self.document(), allow_nan=False)})
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | Path) -> SiteModelBundle:
        """Read and check a bundle; :class:`BundleError` names what is wrong."""
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        if not p.is_file():
            raise BundleError(f"{p}: bundle file not found")
        try:
            with safe_open(str(p), framework="numpy") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
        except (SafetensorError, OSError, ValueError) as e:
            raise BundleError(f"{p}: not a fedmeta site-model bundle (not a readable safetensors "
                              f"file: {e})") from e
        if META_KEY not in meta:
            raise BundleError(f"{p}: a safetensors file but not a fedmeta site-model bundle (a run's "
                              "final.safetensors holds parameters only; `fedmeta adapt` writes bundles)")
        try:
            doc = json.loads(meta[META_KEY])
        except json.JSONDecodeError as e:
            raise BundleError(f"{p}: the bundle's description is not valid JSON: {e}") from e
        if doc.get("format") != FORMAT:
            raise BundleError(f"{p}: format {doc.get('format')!r} is not {FORMAT!r}")
        version = doc.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise BundleError(f"{p}: bad format_version {version!r}")
        if version > FORMAT_VERSION:
            raise BundleError(f"{p}: written by a newer fedmeta (bundle format {version}; this fedmeta "
                              f"reads up to {FORMAT_VERSION}). Hint: upgrade fedmeta")
        if doc.get("weights_sha256") != _digest(tensors):
            raise BundleError(f"{p}: the weights do not match the bundle's digest (the file was "
                              "modified or damaged after it was written)")
        try:
            params = {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}
            th = doc.get("threshold")
            return cls(
                ModelSpec(str(doc["model"]["name"]), dict(doc["model"]["kwargs"])), params,
                preprocessing_from_dict(doc["preprocessing"]), str(doc["outcome"]),
                tuple(str(c) for c in doc["classes"]), Provenance.from_dict(doc["provenance"]),
                head=V1_HEADS.get(doc["head"], doc["head"]) if version == 1 else doc["head"],
                memory={k[len("head/"):]: v for k, v in tensors.items() if k.startswith("head/")},
                calibration=Calibration.from_dict(doc["calibration"]),
                threshold=Threshold.from_dict(th) if th else None,
                adaptation=doc.get("adaptation") or {}, metrics=doc.get("metrics"),
                id_column=doc.get("id_column"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{p}: the bundle's description is incomplete or invalid: {e!r}") from e


def _metric(head: str) -> MetricHead:
    """The metric learner whose classifier a bundle's ``head`` names."""
    from fedmeta.common import algorithms

    if head not in algorithms.names():
        raise ValueError(f"head {head!r} is neither 'logits' nor a metric learner this fedmeta knows")
    metric = algorithms.get(head).metric
    if metric is None:
        raise ValueError(f"head {head!r}: algorithm {head} has no support-set classifier")
    return metric


def _to_numpy(params: Mapping[str, torch.Tensor] | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (v.detach().to("cpu", torch.float32).numpy().copy() if isinstance(v, torch.Tensor)
                else np.asarray(v, dtype=np.float32).copy()) for k, v in params.items()}


def _json_ready(obj: Any) -> Any:
    from fedmeta.common.clinical.metrics import json_ready

    return json_ready(obj)


def check_params(model: nn.Module, params: Mapping[str, Any], *, source: str) -> None:
    """Raise :class:`DataError` unless ``params`` has exactly ``model``'s parameter names and
    shapes, naming each difference — instead of PyTorch's "mat1 and mat2 shapes cannot be
    multiplied" deep inside a forward pass (e.g. a site whose table encodes to another number of
    features than the run's model expects)."""
    shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
    missing, extra = sorted(set(shapes) - set(params)), sorted(set(params) - set(shapes))
    if missing or extra:
        raise DataError(f"{source} do not fit the model: missing {missing}, extra {extra}")
    wrong = {k: (tuple(np.shape(params[k])), shapes[k]) for k in shapes
             if tuple(np.shape(params[k])) != shapes[k]}
    if wrong:
        first = next(iter(model.modules()))
        width = getattr(first, "in_features", None)
        hint = f"; the model takes {width} input features" if width else ""
        raise DataError(f"{source} do not fit the model: (given, expected) shapes {wrong}{hint}")


def check_input_width(model: nn.Module, n_features: int, *, source: str,
                      feature_names: Sequence[str] = ()) -> None:
    """Raise :class:`DataError` when a table encodes to another number of features than the
    model's input layer takes (``fedmeta adapt`` on a site with another schema)."""
    width = getattr(model, "in_features", None)
    if width is not None and width != n_features:
        shown = f" ({', '.join(feature_names[:12])}{', …' if len(feature_names) > 12 else ''})" if feature_names else ""
        raise DataError(f"{source}: the data encode to {n_features} features{shown}, but the model "
                        f"takes {width}. Hint: use the experiment's schema (same columns, categories "
                        "and missing-indicator setting) for this site")


class SiteModel:
    """A loaded bundle, ready to score new patients (``predict_proba``)."""

    def __init__(self, bundle: SiteModelBundle) -> None:
        self.bundle = bundle
        self.network = bundle.model.build()
        try:
            check_params(self.network, bundle.params, source="the bundle's weights")
        except DataError as e:
            raise BundleError(f"{e} (model {bundle.model.name!r} {dict(bundle.model.kwargs)})") from e
        self.params = {k: torch.as_tensor(v) for k, v in bundle.params.items()}
        self.metric = _metric(bundle.head) if bundle.head != "logits" else None
        self.memory = {k: torch.as_tensor(v) for k, v in bundle.memory.items()}
        self.network.eval()

    @property
    def preprocessing(self) -> Preprocessing:
        return self.bundle.preprocessing

    def check(self, table: pd.DataFrame | np.ndarray, *, source: str = "table") -> list[str]:
        """Refuse a table (or images) that differs from what the model was fitted on
        (:class:`DataError` naming what differs); return notes about what is ignored."""
        pre = self.preprocessing
        if isinstance(pre, ImagePreprocessing):
            pre.transform(np.asarray(table), source=source)
            return []
        if not isinstance(table, pd.DataFrame):
            raise DataError(f"{source}: this model scores tables (a pandas DataFrame), got "
                            f"{type(table).__name__}")
        return pre.check(table, source=source, id_column=self.bundle.id_column)

    def inputs(self, table: pd.DataFrame | np.ndarray, *, source: str = "table") -> np.ndarray:
        """The network input (preprocessed, float32) of every row or image."""
        pre = self.preprocessing
        if isinstance(pre, ImagePreprocessing):
            return pre.transform(np.asarray(table), source=source)
        if not isinstance(table, pd.DataFrame):
            raise DataError(f"{source}: this model scores tables (a pandas DataFrame), got "
                            f"{type(table).__name__}")
        assert isinstance(pre, EhrPreprocessing | HeartPreprocessing)
        return pre.transform(table, source=source)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Class logits ``(n, C)`` of preprocessed inputs (float64)."""
        with torch.no_grad():
            xt = torch.as_tensor(x, dtype=torch.float32)
            if self.metric is None:
                out = functional_call(self.network, self.params, (xt,))
            else:
                z = self.metric.embed(self.network, self.params, xt)
                out = self.metric.scores(self.network, self.params, z, self.memory)
            return out.to(torch.float64).numpy()

    def score(self, x: np.ndarray) -> np.ndarray:
        """Binary: the positive-class logit ``s`` before calibration."""
        z = torch.as_tensor(self.logits(x))
        return positive_logit(z).numpy()

    def risks(self, x: np.ndarray) -> np.ndarray:
        """Binary: calibrated risks ``σ(a + b·s)``; multiclass: softmax probabilities ``(n, C)``."""
        if self.bundle.binary:
            return self.bundle.calibration.apply(self.score(x))
        z = self.logits(x)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def predict_proba(self, table: pd.DataFrame | np.ndarray, *, source: str = "table",
                      log_notes: bool = True) -> pd.DataFrame:
        """Risks and decisions per patient.

        Binary: columns ``[id_column,] risk, decision`` (``decision = 1`` when
        ``risk ≥ threshold``). Multiclass: ``[id_column,] p_<class>…, decision`` (the most
        probable class). A table that differs from the model's raises :class:`DataError`.
        """
        for note in self.check(table, source=source):
            if log_notes:
                log.info("%s", note)
        x = self.inputs(table, source=source)
        out = pd.DataFrame(index=range(len(x)))
        if self.bundle.id_column and isinstance(table, pd.DataFrame):
            out[self.bundle.id_column] = table[self.bundle.id_column].to_numpy()
        if self.bundle.binary:
            assert self.bundle.threshold is not None
            r = self.risks(x)
            out["risk"] = r
            out["decision"] = (r >= self.bundle.threshold.value).astype(np.int64)
        else:
            prob = self.risks(x)
            for j, c in enumerate(self.bundle.classes):
                out[f"p_{c}"] = prob[:, j]
            out["decision"] = [self.bundle.classes[j] for j in prob.argmax(axis=1)]
        return out


def load_site_model(path: str | Path) -> SiteModel:
    """Load a site-model bundle written by ``fedmeta adapt`` (or :meth:`SiteModelBundle.save`)."""
    return SiteModel(SiteModelBundle.load(path))
