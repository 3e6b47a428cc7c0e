"""How a hospital scores the coordinator's state on its own test split, before and after local
adaptation, in plain PyTorch (no Flower import).

Tables: for **every outcome** the site labels, θ is adapted to that outcome's labelled training
rows by the adaptation policy (:func:`fedmeta.common.adaptation.adapt_with_policy`: how far to
adapt — not at all, the intercept only, the last layer or every parameter, how many steps and how
strong a pull toward θ — chosen by cross-validated log-loss on the site's own rows; then
recalibrated and given a decision threshold), unless ``eval.adaptation: fixed``. Meta-SGD adapts
with its learned per-parameter rates; the metric learners (Prototypical, Matching and Relation
Networks) classify with what they keep of the site's labelled patients (recalibrated on
leave-one-out scores). With ``eval.shots`` = K the site adapts on K
patients drawn stratified ``eval.draws`` times and reports the mean and the spread over draws.

"before" is θ's risk at 0.5; "after" the adapted, calibrated risk — accuracy at 0.5 (comparable
with "before"), sensitivity, specificity, PPV and NPV at the chosen threshold. Every number is
computed over a whole split (:func:`fedmeta.common.clinical.metrics.clinical_metrics`, with
bootstrap intervals): never rows, labels or per-patient values. :func:`released_metrics` keeps
only the numbers that rest on at least the site's ``min_patients``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmeta.common import algorithms, deadline
from fedmeta.common.adaptation import (
    AdaptationResult,
    AdaptationSettings,
    SupportHead,
    adapt_with_policy,
    positive_logit,
    predict_logit,
    stratified_shots,
    support_head,
)
from fedmeta.common.algorithms import Algorithm
from fedmeta.common.clinical.calibration import ReliabilityCurve, reliability_curve, sigmoid
from fedmeta.common.clinical.metrics import METRICS, clinical_metrics
from fedmeta.common.config import ExperimentConfig
from fedmeta.common.data.base import ImageSite, Site, TabularSite
from fedmeta.common.data.episodes import EpisodeSampler
from fedmeta.common.data.registry import DataSpec
from fedmeta.common.errors import DataError
from fedmeta.common.experiment import build_model_for
from fedmeta.common.meta.engine import resolve_device
from fedmeta.common.meta.episodic import MetricHead
from fedmeta.common.meta.inner import adapt
from fedmeta.common.meta.types import InnerConfig, Params
from fedmeta.common.metrics import BinaryCounts, multiclass_metrics
from fedmeta.common.params import NDArrays, from_numpy, to_numpy
from fedmeta.sitecore.train import labelled_rows

log = logging.getLogger(__name__)

#: What a scope is called in replies (a number: replies carry numbers only).
SCOPE_CODES = {"none": 0, "intercept": 1, "last": 2, "all": 3, "fixed": 4, "support": 5}
#: Metrics computed over the whole test split; the others rest on a part of it.
_BASIS_PART = {"sensitivity": "events", "specificity": "non_events", "ppv": "flagged", "npv": "unflagged"}


def _predict(model: nn.Module, params: Params, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        logits = torch.func.functional_call(model, params, (x,))
    return logits.detach().to("cpu", torch.float64).numpy()


def fixed_inner(cfg: ExperimentConfig, *, learned_rates: bool = False) -> InnerConfig:
    """The inner loop of a fixed adaptation (``eval.adaptation: fixed``, and every multi-class
    outcome): ``eval.adapt_steps`` steps of ``eval.adapt_lr`` pulled toward θ by
    ``eval.proximal`` (0 steps: θ as it is), or Meta-SGD's ``inner.steps`` with its own learned
    rates. The one place these settings are read, for the federated evaluation and ``adapt``."""
    if learned_rates:
        return InnerConfig(steps=cfg.inner.steps, lr=cfg.inner.lr)
    e = cfg.eval
    return InnerConfig(steps=e.adapt_steps, lr=e.adapt_lr, proximal=e.proximal)


def adaptation_settings(cfg: ExperimentConfig, *, learned_rates: bool = False) -> AdaptationSettings:
    """The policy's settings from ``eval`` (Meta-SGD: up to ``inner.steps`` steps, its own rates)."""
    e = cfg.eval
    max_steps = cfg.inner.steps if learned_rates else e.adapt_steps
    scopes = e.scopes if max_steps > 0 else tuple(s for s in e.scopes if s in ("none", "intercept"))
    return AdaptationSettings(
        max_steps=max(1, max_steps), lr=e.adapt_lr, proximal=tuple(sorted({0.0, 0.1, 1.0, float(e.proximal)})),
        scopes=scopes, folds=e.folds, repeats=e.repeats, rule=e.rule, calibration=e.calibration,
        threshold=e.threshold,
    )


@dataclass
class PhaseScores:
    """One phase's metrics over a test split: ``values`` (metric -> number, ``<metric>.lo`` /
    ``.hi`` for intervals), ``basis`` (metric -> patients it rests on) and the reliability curve."""

    values: dict[str, float]
    basis: dict[str, int]
    curve: ReliabilityCurve
    warnings: list[str] = field(default_factory=list)
    #: :func:`clinical_metrics`' own result (one draw; the model card's input)
    clinical: dict[str, Any] = field(default_factory=dict)


def score_risks(y: np.ndarray, risk: np.ndarray, *, threshold: float, rng: np.random.Generator,
                n_boot: int) -> PhaseScores:
    """Clinical metrics of one outcome (:func:`clinical_metrics`) flattened for a summary, plus
    ``accuracy`` at 0.5 (whatever the decision threshold), ``loss`` (log-loss) and ``loss_sq``,
    the mean of the patients' squared log-losses: with ``loss`` and the count it gives the
    standard error of a pooled log-loss (model selection's one-standard-error rule), an aggregate
    over the whole split like the log-loss itself."""
    m = clinical_metrics(y, risk, threshold=threshold, rng=rng, n_boot=n_boot)
    values: dict[str, float] = {"prevalence": float(m["prevalence"]["value"]), "threshold": float(threshold)}
    basis: dict[str, int] = {}
    for name in METRICS:
        key = {"log_loss": "loss", "accuracy": "accuracy_at_threshold"}.get(name, name)
        values[key] = float(m[name]["value"])
        if n_boot:
            values[f"{key}.lo"], values[f"{key}.hi"] = float(m[name]["lo"]), float(m[name]["hi"])
        basis[key] = int(m[name]["basis"])
    values["accuracy"] = BinaryCounts.from_predictions(y, risk, threshold=0.5).accuracy
    from fedmeta.common.clinical.metrics import EPS

    clipped = np.clip(np.asarray(risk, dtype=np.float64), EPS, 1 - EPS)
    row_ll = -np.where(np.asarray(y) == 1, np.log(clipped), np.log(1 - clipped))
    values["loss_sq"] = float(np.mean(row_ll ** 2)) if row_ll.size else math.nan
    basis.update({"accuracy": int(m["n"]), "prevalence": int(m["n"]), "threshold": int(m["n"]),
                  "loss_sq": basis["loss"]})  # released exactly when the log-loss is
    c = BinaryCounts.from_predictions(y, risk, threshold=threshold)
    basis.update({"sensitivity": c.events, "specificity": c.n - c.events, "ppv": c.tp + c.fp,
                  "npv": c.tn + c.fn})
    curve = reliability_curve(y, risk)
    return PhaseScores(values, basis, curve, list(m["warnings"]), m)


@dataclass
class OutcomeResult:
    """One outcome at one site: scores before and after, their spread over draws (shots), the
    counts, and (local only) the adaptation of the last draw."""

    before: PhaseScores
    after: PhaseScores
    spread: dict[str, dict[str, float]]
    n_train: int
    n_test: int
    events: int
    draws: int
    adapt_steps: int
    scope: str
    adaptation: AdaptationResult | SupportHead | None = None
    params: Params | None = None
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "before": dict(self.before.values), "after": dict(self.after.values),
            "n_train": self.n_train, "n_test": self.n_test, "events": self.events,
            "adapt_steps": self.adapt_steps, "adapt_scope": self.scope,
        }
        if self.draws > 1:
            out["draws"] = self.draws
            out["spread"] = self.spread
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out


def draw_shots(y: np.ndarray, k: int, rng: np.random.Generator, outcome: str) -> tuple[np.ndarray, str | None]:
    """K stratified patients; when the site's rows hold one class, K at random with a warning."""
    try:
        return stratified_shots(y, k, rng, outcome=outcome), None
    except DataError as e:
        idx = rng.choice(len(y), size=min(k, len(y)), replace=False)
        return idx, str(e).split(". Hint")[0]


def _mean_scores(parts: list[PhaseScores]) -> tuple[PhaseScores, dict[str, float]]:
    """Mean (NaN-skipping) and standard deviation over draws of each metric."""
    keys = [k for k in parts[0].values if "." not in k]
    mean: dict[str, float] = {}
    sd: dict[str, float] = {}
    for k in keys:
        vals = np.array([p.values[k] for p in parts], dtype=np.float64)
        ok = vals[np.isfinite(vals)]
        mean[k] = float(ok.mean()) if ok.size else math.nan
        sd[k] = float(ok.std(ddof=1)) if ok.size > 1 else math.nan
    basis = {k: min(p.basis[k] for p in parts) for k in parts[0].basis}
    curve = parts[0].curve
    for p in parts[1:]:
        curve = curve + p.curve
    d = len(parts)
    curve = ReliabilityCurve(curve.edges, curve.count / d, curve.risk_sum / d, curve.event_sum / d)
    warnings = sorted({w for p in parts for w in p.warnings})
    return PhaseScores(mean, basis, curve, warnings), sd


def evaluate_outcome(
    cfg: ExperimentConfig, model: nn.Module, params: Params, extra: Params | None, *, algorithm: Algorithm,
    x_tr: torch.Tensor, y_tr: np.ndarray, x_te: torch.Tensor, y_te: np.ndarray, outcome: str,
    rng: np.random.Generator,
) -> OutcomeResult:
    """Adapt θ to one outcome's labelled training rows and score that outcome's test rows."""
    e = cfg.eval
    device = x_tr.device
    k = e.shots
    n_draws = e.draws if 0 < k < len(y_tr) else 1
    n_boot = e.bootstrap if n_draws == 1 else 0
    settings = adaptation_settings(cfg, learned_rates=algorithm.evaluation == "learned_rates")
    warnings: list[str] = []
    befores: list[PhaseScores] = []
    afters: list[PhaseScores] = []
    last: AdaptationResult | SupportHead | None = None
    adapted: Params | None = None
    steps, scope, n_used = 0, "none", len(y_tr)
    for _ in range(n_draws):
        deadline.check()
        if 0 < k < len(y_tr):
            idx, note = draw_shots(y_tr, k, rng, outcome)
            if note:
                warnings.append(note)
        else:
            idx = np.arange(len(y_tr))
        xs = x_tr[torch.from_numpy(idx).to(device)]
        ys_np = y_tr[idx]
        ys = torch.from_numpy(ys_np).to(device)
        n_used = len(idx)
        if algorithm.metric is not None:
            metric = algorithm.metric
            few = torch.from_numpy(rng.choice(len(idx), size=min(cfg.tasks.support, len(idx)), replace=False))
            s_before = _support_score(metric, model, params, xs[few.to(device)], ys[few.to(device)], x_te)
            p_before = sigmoid(s_before)
            head = support_head(metric, model, params, xs, ys, threshold=e.threshold) \
                if len(set(ys_np.tolist())) == 2 else None
            if head is None:
                p_after, t_after = p_before, 0.5
                warnings.append(f"{outcome}: the labelled patients hold one class; no {metric.name} classifier")
            else:
                lg = head.logits(model, params, x_te).double()
                p_after = head.calibration.apply(positive_logit(lg).cpu().numpy())
                t_after = head.threshold.value if head.threshold else 0.5
                warnings += list(head.warnings)
            last, scope = head, "support"
        else:
            s_before = predict_logit(model, params, x_te)
            p_before = sigmoid(s_before)
            if e.adaptation == "fixed":
                inner = fixed_inner(cfg, learned_rates=extra is not None)
                adapted = params if inner.steps == 0 else adapt(model, params, xs, ys, inner, lrs=extra)
                p_after, t_after, scope = sigmoid(predict_logit(model, adapted, x_te)), 0.5, "fixed"
            else:
                res = adapt_with_policy(model, params, xs, ys, settings=settings, rng=rng, lrs=extra)
                adapted, last = res.params, res
                steps, scope = res.choice.steps, res.choice.scope
                p_after = res.calibration.apply(predict_logit(model, res.params, x_te))
                t_after = res.threshold.value
                warnings += list(res.warnings)
        befores.append(score_risks(y_te, p_before, threshold=0.5, rng=rng, n_boot=n_boot))
        afters.append(score_risks(y_te, p_after, threshold=t_after, rng=rng, n_boot=n_boot))
    spread: dict[str, dict[str, float]] = {}
    if n_draws > 1:
        before, spread["before"] = _mean_scores(befores)
        after, spread["after"] = _mean_scores(afters)
    else:
        before, after = befores[0], afters[0]
    return OutcomeResult(before, after, spread, n_used, len(y_te), int((y_te == 1).sum()), n_draws,
                         int(steps), scope, last, adapted, sorted(set(warnings)))


def _support_score(metric: MetricHead, model: nn.Module, params: Params, xs: torch.Tensor, ys: torch.Tensor,
                   xq: torch.Tensor) -> np.ndarray:
    """Positive-class score of ``metric``'s classifier of ``(xs, ys)``; 0 where a class is absent."""
    present = sorted(set(ys.cpu().tolist()))
    if present != [0, 1]:
        return np.zeros(len(xq))
    with torch.no_grad():
        lg = metric.logits(model, params, xs, ys, xq, n_way=2)
    return positive_logit(lg).to("cpu", torch.float64).numpy()


def evaluate_site(
    cfg: ExperimentConfig, spec: DataSpec, site: Site, state: NDArrays, *, rng: np.random.Generator,
    keep_params: bool = False,
) -> dict:
    """Score the global state on the site's test split before and after local adaptation.

    Returns ``before``/``after`` (the first outcome: the one the consortium trains on),
    ``n_train``, ``n_test``, ``events``, ``adapt_steps``, ``adapt_scope``, with ``eval.shots``
    also ``draws`` and ``spread`` (standard deviation over draws), and ``outcomes`` (every
    outcome's :meth:`OutcomeResult.summary`) when the site labels more than one. ``keep_params``
    adds, for local use only, ``"result"`` (the first outcome's :class:`OutcomeResult`, with the
    adapted parameters and the policy's choice); nothing of it is ever sent.
    """
    if isinstance(site, ImageSite):
        return evaluate_episodes(cfg, spec, site, state, rng=rng)
    assert isinstance(site, TabularSite)
    algorithm = algorithms.get(cfg.algorithm)
    device = resolve_device(cfg.engine.device)
    model = build_model_for(cfg, spec).to(device)
    theta_np, extra_np = algorithm.split(state)
    params = from_numpy(theta_np, device=device)
    extra = from_numpy(extra_np, device=device) if algorithm.evaluation == "learned_rates" else None
    results: dict[str, OutcomeResult] = {}
    for j, outcome in enumerate(site.outcomes):
        deadline.check()
        x_tr, y_tr = labelled_rows(site, "train", j)
        x_te, y_te = labelled_rows(site, "test", j)
        if len(y_te) == 0 or len(y_tr) == 0:
            continue
        results[outcome] = evaluate_outcome(
            cfg, model, params, extra, algorithm=algorithm,
            x_tr=torch.from_numpy(x_tr).to(device), y_tr=y_tr, x_te=torch.from_numpy(x_te).to(device),
            y_te=y_te, outcome=outcome, rng=rng)
    if not results:
        raise DataError(f"site {site.name}: no outcome has labelled training and test patients")
    first = results.get(site.outcomes[0]) or next(iter(results.values()))
    out: dict[str, Any] = first.summary()
    out["reliability"] = {"before": first.before.curve, "after": first.after.curve}
    out["basis"] = {"before": first.before.basis, "after": first.after.basis}
    if len(site.outcomes) > 1:
        out["outcomes"] = {name: r.summary() for name, r in results.items()}
        out["outcome_basis"] = {name: {"before": r.before.basis, "after": r.after.basis} for name, r in results.items()}
    if keep_params:
        out["result"] = first
        if first.params is not None:
            out["params"] = to_numpy(first.params)
    return out


#: Released keys that are counts (sent as integers).
COUNT_KEYS = frozenset({"n_train", "n_test", "events", "adapt_steps", "adapt_scope", "draws", "withheld", "n"})


def is_count(key: str) -> bool:
    """Whether a released key (:func:`released_metrics`) is a count."""
    return key.rsplit(".", 1)[-1] in COUNT_KEYS


#: Threshold metrics that, with the prevalence and the split size, determine each other and the
#: confusion matrix's cells (accuracy = prevalence × sensitivity + (1 − prevalence) ×
#: specificity): released all together or not at all.
CONFUSION = frozenset({"sensitivity", "specificity", "ppv", "npv", "accuracy", "accuracy_at_threshold"})


def _small_cell(events: float, others: float, floor: int) -> bool:
    """A non-zero count of events or of non-events below ``floor``."""
    return any(0 < c < floor for c in (events, others))


def released_metrics(result: dict, outcomes: tuple[str, ...], *, floor: int) -> tuple[dict[str, float], int]:
    """The numbers of :func:`evaluate_site`'s result that may leave the site, flat
    (``before.auroc``, ``after.sensitivity.lo``, ``spread.after.auroc``, ``o1.after.auroc`` for
    the second outcome, …), and how many were withheld: a metric resting on fewer than ``floor``
    patients (sensitivity on the events, PPV on the flagged patients, …) is not sent, nor is a
    reliability bin holding fewer than ``floor`` patients, or a non-zero count of events or
    non-events below ``floor`` (a cell of zero discloses nothing of a patient, as DataSHIELD's
    ``nfilter.tab`` counts only non-zero cells).

    Nothing derivable from what is released rests on fewer patients either: when one metric of
    the confusion family (:data:`CONFUSION`) is withheld, all of them are (a withheld specificity
    would follow from accuracy, sensitivity and prevalence), and when the events or the non-events
    of the test split are a non-zero count below ``floor``, neither the event count, the prevalence nor any
    of the family is released (each gives the other counts)."""
    flat: dict[str, float] = {}
    withheld = 0

    def phase(prefix: str, entry: dict, basis: dict) -> None:
        nonlocal withheld
        events = entry.get("events")
        n_test = entry.get("n_test")
        rare = events is not None and n_test is not None and _small_cell(events, n_test - events, floor)
        for ph in ("before", "after"):
            rests = {key.split(".")[0]: basis.get(ph, {}).get(key.split(".")[0], floor) for key in entry[ph]}
            # a metric resting on no patient is undefined (NaN), not disclosive
            family_out = rare or any(0 < rests[m] < floor for m in CONFUSION if m in rests)
            for key, value in entry[ph].items():
                metric = key.split(".")[0]
                hidden = rests[metric] < floor or (family_out and (metric in CONFUSION or metric == "prevalence"))
                if hidden:
                    withheld += 1 if rests[metric] > 0 and not key.endswith((".lo", ".hi")) else 0
                    continue
                if value is not None and math.isfinite(value):
                    flat[f"{prefix}{ph}.{key}"] = float(value)
            for key, value in entry.get("spread", {}).get(ph, {}).items():
                hidden = basis.get(ph, {}).get(key, floor) < floor or (family_out and key in CONFUSION | {"prevalence"})
                if not hidden and math.isfinite(value):
                    flat[f"{prefix}spread.{ph}.{key}"] = float(value)
        for key in ("n_train", "n_test", "events", "adapt_steps", "draws"):
            if key in entry and not (key == "events" and rare):
                flat[f"{prefix}{key}"] = float(entry[key])
        if "adapt_scope" in entry:
            flat[f"{prefix}adapt_scope"] = float(SCOPE_CODES.get(entry["adapt_scope"], -1))

    phase("", result, result.get("basis", {}))
    for ph, curve in result.get("reliability", {}).items():
        for b in range(len(curve.count)):
            events_in_bin = float(curve.event_sum[b])
            if curve.count[b] >= floor and not _small_cell(events_in_bin, curve.count[b] - events_in_bin, floor):
                flat[f"rel.{ph}.{b}.n"] = float(round(float(curve.count[b])))
                flat[f"rel.{ph}.{b}.risk"] = float(curve.risk_sum[b] / curve.count[b])
                flat[f"rel.{ph}.{b}.observed"] = float(curve.event_sum[b] / curve.count[b])
            elif curve.count[b] > 0:
                withheld += 1
    for j, name in enumerate(outcomes):
        entry = result.get("outcomes", {}).get(name)
        if entry is not None and j > 0:
            phase(f"o{j}.", entry, result.get("outcome_basis", {}).get(name, {}))
    flat["withheld"] = float(withheld)
    return flat, withheld


def evaluate_episodes(
    cfg: ExperimentConfig, spec: DataSpec, site: ImageSite, state: NDArrays, *, rng: np.random.Generator,
    n_episodes: int = 20,
) -> dict[str, dict[str, float] | int]:
    """Few-shot accuracy on ``n_episodes`` ``ways``-way episodes from the site's test split (of
    its novel classes when ``data.novel_classes`` > 0).

    "before": θ applied to the query images with no adaptation (gradient methods) or a metric
    learner's classifier of one shot per class; "after": adapted on the K-shot support set with
    ``inner.steps`` steps (Meta-SGD: its learned rates), or the classifier of all K shots. Metrics
    pool every query of every episode (sums and counts, not a mean of episode means).
    """
    algorithm = algorithms.get(cfg.algorithm)
    device = resolve_device(cfg.engine.device)
    model = build_model_for(cfg, spec).to(device)
    theta_np, extra_np = algorithm.split(state)
    params = from_numpy(theta_np, device=device)
    t = cfg.tasks
    if cfg.data.novel_classes > 0:  # score adaptation to classes never seen in meta-training
        from fedmeta.common.data.images import load_novel_site

        site = load_novel_site(cfg.data, site.name)
    sampler = EpisodeSampler(site.x_test, site.y_test, n_way=t.ways, k_shot=t.support, n_query=t.query)
    eps = sampler.sample(n_episodes, rng=rng).to(device)
    lrs = from_numpy(extra_np, device=device) if algorithm.evaluation == "learned_rates" else None
    labels: list[np.ndarray] = []
    logits: dict[str, list[np.ndarray]] = {"before": [], "after": []}
    for i in range(eps.n_tasks):
        xs, ys, xq = eps.xs[i], eps.ys[i], eps.xq[i]
        labels.append(eps.yq[i].cpu().numpy())
        if algorithm.metric is not None:
            one = torch.stack([torch.nonzero(ys == c)[0, 0] for c in range(t.ways)])
            with torch.no_grad():
                zb = algorithm.metric.logits(model, params, xs[one], ys[one], xq, n_way=t.ways)
                za = algorithm.metric.logits(model, params, xs, ys, xq, n_way=t.ways)
            logits["before"].append(zb.cpu().double().numpy())
            logits["after"].append(za.cpu().double().numpy())
            continue
        logits["before"].append(_predict(model, params, xq))
        inner = fixed_inner(cfg, learned_rates=lrs is not None)
        adapted = params if inner.steps == 0 else adapt(model, params, xs, ys, inner, lrs=lrs)
        logits["after"].append(_predict(model, adapted, xq))
    y = np.concatenate(labels)
    out: dict[str, dict[str, float] | int] = {}
    for phase, parts in logits.items():
        scores = multiclass_metrics(y, np.concatenate(parts))
        out[phase] = {"accuracy": scores["accuracy"], "auroc": float("nan"), "loss": scores["loss"]}
    out["n_train"] = int(site.n_train)
    out["n_test"] = int(site.n_test)
    return out
