"""The new hospital's adaptation policy: how far to adapt, chosen on its own labelled rows.

Fine-tuning a consortium's model on a handful of patients can lower its discrimination (every
adapted method in BENCHMARKS.md ranks worse than one global model). :func:`adapt_with_policy`
therefore treats "how far to adapt" as a model choice made by cross-validation on a **proper
scoring rule** (log-loss; Gneiting & Raftery 2007), with "do not adapt" and "intercept only"
always among the candidates:

- ``none``: θ as received;
- ``intercept``: only the output intercept moves — the positive-class logit shifts by ``δ``,
  ``δ = argmin (1/n) Σ ℓ(y_i, s_i + δ) + (λ/2) δ²`` solved by Newton's method (for a 2-logit
  output the bias moves by ``(−δ/2, +δ/2)``). It corrects a different prevalence and never
  changes the ranking (AUROC);
- ``last`` / ``all``: ``s`` full-batch gradient steps of ``lr`` on the last linear layer / every
  parameter, ``φ ← φ − lr (∇L(φ) + λ (φ − θ))`` as in :func:`fedmeta.common.meta.inner.adapt`
  (Meta-SGD: the learned per-parameter rates), for every step count of the grid and every
  proximal strength ``λ``.

With fewer than ``min_refit_events`` (20) patients in the smaller class only ``none`` and
``intercept`` compete: re-estimating the ranking needs more events than recalibrating it (the
updating hierarchy of Janssen et al. 2008, J Clin Epidemiol 61:76, and Vergouwe et al. 2017,
Stat Med 36:4529: intercept, then slope, then revision as the data allow).

Cross-validation: leave-one-out while the site has at most ``loo_max`` labelled rows (or a class
has fewer rows than folds), otherwise ``repeats`` × stratified ``folds``-fold. Every candidate is
scored by its mean held-out log-loss; with ``rule="1se"`` the simplest candidate within one
standard error of the best is taken (Breiman et al. 1984, "Classification and Regression
Trees", ch. 3; Hastie, Tibshirani & Friedman 2009 §7.10), the standard error being that of the
per-patient loss difference to the best candidate (paired). The choice never has a higher
cross-validated log-loss than ``none``. The chosen candidate is refitted on all rows; its
out-of-fold scores then fit a recalibration (Platt 1999, or intercept only; see
:mod:`fedmeta.common.clinical.calibration`) and the threshold is chosen on the calibrated
out-of-fold risks by the stated policy (:mod:`fedmeta.common.clinical.thresholds`).

:func:`stratified_shots` draws K labelled patients with every class present (or refuses).
:func:`support_head` does the same job for the metric learners (Prototypical, Matching and
Relation Networks), whose classifier is what they keep of the site's support set.

Example::

    >>> import numpy as np, torch
    >>> from fedmeta.common.models import build_model, init_params
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("linear", in_features=3, out_features=2)
    >>> x, y = torch.randn(12, 3), torch.tensor([0, 1] * 6)
    >>> res = adapt_with_policy(model, init_params(model), x, y, rng=np.random.default_rng(0))
    >>> res.scheme, res.choice.scope in SCOPES
    ('leave-one-out, 12 folds', True)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedmeta.common import deadline
from fedmeta.common.clinical.calibration import (
    DIVERGED,
    Calibration,
    CalibrationMethod,
    fit_calibration,
    sigmoid,
)
from fedmeta.common.clinical.metrics import MIN_EVENTS
from fedmeta.common.clinical.thresholds import Threshold, ThresholdPolicy, choose_threshold
from fedmeta.common.errors import DataError
from fedmeta.common.meta.episodic import MetricHead
from fedmeta.common.meta.inner import adapt
from fedmeta.common.meta.types import InnerConfig, Params
from fedmeta.common.metrics import EPS, auroc

log = logging.getLogger(__name__)

Scope = Literal["none", "intercept", "last", "all"]
SCOPES: tuple[str, ...] = ("none", "intercept", "last", "all")
_RANK = {s: i for i, s in enumerate(SCOPES)}


@dataclass(frozen=True)
class AdaptationSettings:
    """What the policy may choose from and how it chooses.

    ``max_steps``/``step_fractions``: the step grid ``round(max_steps · f)``; ``lr``: the step
    size; ``proximal``: candidate pulls ``λ`` toward θ (also the intercept's penalty);
    ``scopes``: candidate scopes (``none`` and ``intercept`` are always added); ``folds``,
    ``repeats``, ``loo_max``: the cross-validation (module docstring); ``rule``: ``min`` or
    ``1se``; ``calibration``: ``platt``, ``intercept`` or ``none``, Platt only with at least
    ``min_calibration_events`` events and non-events (else intercept only);
    ``min_refit_events``: ``last``/``all`` are candidates only when the smaller class has at least
    this many patients (below it the site's rows cannot tell a real difference in ranking from
    chance: only ``none`` and ``intercept`` compete); ``threshold``: a
    :class:`~fedmeta.common.clinical.thresholds.ThresholdPolicy` text.
    """

    max_steps: int = 100
    lr: float = 0.05
    step_fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
    proximal: tuple[float, ...] = (0.0, 0.1, 1.0)
    scopes: tuple[str, ...] = SCOPES
    folds: int = 5
    repeats: int = 3
    loo_max: int = 40
    rule: Literal["min", "1se"] = "1se"
    calibration: CalibrationMethod = "platt"
    min_calibration_events: int = 10
    min_refit_events: int = 20
    threshold: str = "prevalence"

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.step_fractions or any(not 0 < f <= 1 for f in self.step_fractions):
            raise ValueError(f"step_fractions must be in (0, 1], got {self.step_fractions}")
        if not self.proximal or any(p < 0 or not math.isfinite(p) for p in self.proximal):
            raise ValueError(f"proximal strengths must be finite and >= 0, got {self.proximal}")
        unknown = sorted(set(self.scopes) - set(SCOPES))
        if unknown:
            raise ValueError(f"unknown scope(s) {unknown}; choose from {SCOPES}")
        if self.min_refit_events < 0 or self.min_calibration_events < 0:
            raise ValueError("min_refit_events and min_calibration_events must be >= 0")
        if self.folds < 2 or self.repeats < 1 or self.loo_max < 0:
            raise ValueError(f"need folds >= 2, repeats >= 1, loo_max >= 0; got {self.folds}, "
                             f"{self.repeats}, {self.loo_max}")
        if self.rule not in ("min", "1se"):
            raise ValueError(f"rule must be 'min' or '1se', got {self.rule!r}")
        if self.calibration not in ("platt", "intercept", "none"):
            raise ValueError(f"calibration must be platt, intercept or none, got {self.calibration!r}")
        ThresholdPolicy.parse(self.threshold)

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(sorted({max(1, int(round(self.max_steps * f))) for f in self.step_fractions}))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, order=True)
class Candidate:
    """One way to adapt: ``scope``, ``steps`` (gradient steps; 0 for none/intercept) and the
    proximal strength ``proximal``."""

    scope: str
    steps: int = 0
    proximal: float = 0.0

    @property
    def complexity(self) -> tuple[int, int, float]:
        """Simpler first: fewer parameters, fewer steps, stronger pull toward θ."""
        return (_RANK[self.scope], self.steps, -self.proximal)

    def text(self) -> str:
        if self.scope == "none":
            return "do not adapt"
        if self.scope == "intercept":
            return f"intercept only (λ = {self.proximal:g})"
        layer = "last layer" if self.scope == "last" else "all parameters"
        return f"{layer}, {self.steps} steps (λ = {self.proximal:g})"


@dataclass(frozen=True)
class CVRow:
    """A candidate's cross-validated scores: mean held-out log-loss and its standard error
    (paired with the best candidate), Brier score and AUROC of the out-of-fold predictions (AUROC
    only for the rows a report shows: the choice, the three lowest log-losses and "do not adapt";
    NaN elsewhere)."""

    candidate: Candidate
    log_loss: float
    se: float
    brier: float
    auroc: float


@dataclass(frozen=True)
class AdaptationResult:
    """What :func:`adapt_with_policy` chose and fitted.

    ``params``: the adapted parameters (refitted on every labelled row); ``calibration`` maps
    the model's positive-class logit to a risk; ``threshold`` flags a patient when
    ``risk ≥ threshold.value``; ``cv`` scores every candidate; ``oof_risk`` holds the calibrated
    out-of-fold risks of the labelled rows (local only, never written to a bundle).
    """

    params: Params
    choice: Candidate
    calibration: Calibration
    threshold: Threshold
    cv: tuple[CVRow, ...]
    scheme: str
    n: int
    class_counts: tuple[int, int]
    settings: AdaptationSettings
    oof_risk: np.ndarray = field(repr=False)
    warnings: tuple[str, ...] = ()

    def row(self, candidate: Candidate) -> CVRow:
        return next(r for r in self.cv if r.candidate == candidate)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (no per-patient value): the choice, the CV table, calibration,
        threshold, counts and settings."""
        def num(v: float) -> float | None:
            return v if math.isfinite(v) else None

        return {
            "choice": {**asdict(self.choice), "text": self.choice.text()},
            "scheme": self.scheme, "rule": self.settings.rule,
            "n": self.n, "class_counts": {"0": self.class_counts[0], "1": self.class_counts[1]},
            "cv": [{**asdict(r.candidate), "log_loss": num(r.log_loss), "se": num(r.se),
                    "brier": num(r.brier), "auroc": num(r.auroc)} for r in self.cv],
            "calibration": self.calibration.to_dict(), "threshold": self.threshold.to_dict(),
            "settings": self.settings.to_dict(), "warnings": list(self.warnings),
        }


# --- model pieces -----------------------------------------------------------------------------


def output_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` of ``model`` (its output layer), with its qualified name."""
    last: tuple[str, nn.Linear] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None or last[1].bias is None:
        raise ValueError(f"{type(model).__name__} has no output nn.Linear with a bias; the "
                         "intercept and last-layer scopes need one")
    if last[1].out_features not in (1, 2):
        raise ValueError(f"the adaptation policy is for binary outcomes: the output layer "
                         f"{last[0]!r} has {last[1].out_features} outputs (need 1 or 2)")
    return last


def positive_logit(out: torch.Tensor) -> torch.Tensor:
    """The positive-class logit ``s``: ``z₁ − z₀`` for two logits (softmax), ``z`` for one."""
    return out[..., 1] - out[..., 0] if out.shape[-1] == 2 else out[..., 0]


def predict_logit(model: nn.Module, params: Params, x: torch.Tensor) -> np.ndarray:
    """``s(x)`` for every row, float64 numpy."""
    with torch.no_grad():
        return positive_logit(functional_call(model, params, (x,))).to("cpu", torch.float64).numpy()


def _free_names(model: nn.Module, params: Params, scope: str) -> list[str]:
    if scope == "all":
        return list(params)
    name, _ = output_layer(model)
    prefix = f"{name}." if name else ""
    names = [f"{prefix}bias"] if scope == "intercept" else [f"{prefix}weight", f"{prefix}bias"]
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"params lack the output layer's {missing}")
    return names


def shift_intercept(model: nn.Module, params: Params, delta: float) -> Params:
    """``params`` with the positive-class logit raised by ``delta`` through the output bias."""
    name, layer = output_layer(model)
    key = f"{name}.bias" if name else "bias"
    bias = params[key].clone()
    if layer.out_features == 2:
        bias[1] += delta / 2
        bias[0] -= delta / 2
    else:
        bias[0] += delta
    return {**params, key: bias}


def fit_intercept_shift(score: np.ndarray, y: np.ndarray, *, penalty: float,
                        weights: np.ndarray | None = None) -> float:
    """``δ = argmin Σ w_i ℓ(y_i, s_i + δ) / Σ w_i + (penalty/2) δ²`` by Newton's method
    (convex; capped at ``±DIVERGED`` when the rows hold one class and ``penalty = 0``)."""
    s = np.asarray(score, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64)
    total = w.sum()
    delta = 0.0
    for _ in range(100):
        p = sigmoid(s + delta)
        g = float((w * (p - t)).sum() / total + penalty * delta)
        h = float((w * p * (1 - p)).sum() / total + penalty)
        step = g / max(h, 1e-12)
        step = max(-5.0, min(5.0, step))
        delta = max(-DIVERGED, min(DIVERGED, delta - step))
        if abs(step) < 1e-12 or abs(delta) >= DIVERGED:
            break
    return delta


def _trajectories(model: nn.Module, theta: Params, free: Sequence[str], x: torch.Tensor,
                  y: torch.Tensor, fit_mask: torch.Tensor, *, lr: float, proximal: float,
                  record: Sequence[int], lrs: Params | None) -> tuple[dict[int, torch.Tensor], Params]:
    """Gradient adaptation of the ``free`` tensors for every fold at once (``torch.func.vmap``).

    Fold ``f`` minimises the mean cross-entropy over its fit rows (``fit_mask[f]``) plus
    ``λ/2 ||φ − θ||²``, exactly the step of :func:`fedmeta.common.meta.inner.adapt`. Returns the
    positive logits of **every** row after each step count in ``record`` (``(F, n)`` each) and
    the folds' free tensors after the last one.
    """
    fixed = {k: v.detach() for k, v in theta.items() if k not in free}
    anchor = {k: theta[k].detach() for k in free}
    n_folds = fit_mask.shape[0]
    phi = {k: v.unsqueeze(0).expand(n_folds, *v.shape).clone() for k, v in anchor.items()}
    w = fit_mask.to(x.dtype if x.is_floating_point() else torch.float32)

    def loss(p: Params, wf: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**fixed, **p}, (x,))
        return (F.cross_entropy(out, y, reduction="none") * wf).sum() / wf.sum()

    grad = torch.func.vmap(torch.func.grad(loss))
    logits = torch.func.vmap(lambda p: positive_logit(functional_call(model, {**fixed, **p}, (x,))))
    out: dict[int, torch.Tensor] = {}
    todo = sorted(set(record))
    with torch.no_grad():
        if 0 in todo:
            out[0] = logits(phi)
        for step in range(1, todo[-1] + 1):
            deadline.check()
            g = grad(phi, w)
            phi = {k: v - (lrs[k] if lrs is not None else lr) * (g[k] + proximal * (v - anchor[k]))
                   for k, v in phi.items()}
            if step in todo:
                out[step] = logits(phi)
    return out, phi


# --- cross-validation -------------------------------------------------------------------------


def cv_folds(y: np.ndarray, settings: AdaptationSettings, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray, str]:
    """Fit masks ``(F, n)`` (True = fit row), each fold's repeat index ``(F,)`` and a description.

    Every row is held out exactly once per repeat. Leave-one-out when ``n ≤ loo_max`` or a class
    has fewer rows than ``folds``; else ``repeats`` stratified ``folds``-fold partitions.
    """
    n = len(y)
    counts = np.bincount(y, minlength=2)
    if n <= settings.loo_max or counts.min() < settings.folds:
        return ~np.eye(n, dtype=bool), np.zeros(n, dtype=np.int64), f"leave-one-out, {n} folds"
    masks, reps = [], []
    for r in range(settings.repeats):
        fold = np.empty(n, dtype=np.int64)
        for c in (0, 1):
            idx = rng.permutation(np.flatnonzero(y == c))
            fold[idx] = (np.arange(len(idx)) + int(rng.integers(settings.folds))) % settings.folds
        for f in range(settings.folds):
            masks.append(fold != f)
            reps.append(r)
    return (np.array(masks), np.array(reps, dtype=np.int64),
            f"{settings.repeats} x stratified {settings.folds}-fold")


def _oof(fold_logits: np.ndarray, masks: np.ndarray, reps: np.ndarray) -> np.ndarray:
    """Out-of-fold logits ``(R, n)`` from every fold's logits on every row ``(F, n)``."""
    out = np.full((int(reps.max()) + 1, masks.shape[1]), np.nan)
    for f in range(masks.shape[0]):
        held = ~masks[f]
        out[reps[f], held] = fold_logits[f, held]
    return out


def _row_losses(oof: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.clip(sigmoid(oof), EPS, 1 - EPS)
    return (-(y * np.log(p) + (1 - y) * np.log(1 - p))).mean(axis=0)


def candidates(settings: AdaptationSettings, *, smaller_class: int | None = None) -> list[Candidate]:
    """Every candidate of the settings, ``none`` and ``intercept`` always included; ``last`` and
    ``all`` only when ``smaller_class`` (patients in the smaller class) reaches
    ``settings.min_refit_events``."""
    out = [Candidate("none")]
    out += [Candidate("intercept", 0, lam) for lam in settings.proximal]
    if smaller_class is not None and smaller_class < settings.min_refit_events:
        return out
    for scope in ("last", "all"):
        if scope in settings.scopes:
            out += [Candidate(scope, s, lam) for s in settings.steps for lam in settings.proximal]
    return out


def _select(rows: list[CVRow], rule: str) -> Candidate:
    best = min(rows, key=lambda r: (r.log_loss, r.candidate.complexity))
    if rule == "min":
        return best.candidate
    ok = [r for r in rows if r.log_loss <= best.log_loss + r.se]
    return min(ok, key=lambda r: r.candidate.complexity).candidate


def adapt_with_policy(
    model: nn.Module,
    theta: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    settings: AdaptationSettings | None = None,
    rng: np.random.Generator,
    lrs: Params | None = None,
) -> AdaptationResult:
    """Choose, refit, calibrate and threshold (module docstring) on the site's labelled ``(x, y)``.

    ``model`` is used only through ``torch.func.functional_call`` with ``theta`` (a binary
    classifier with 1 or 2 output logits); ``y`` holds 0/1 labels; ``lrs`` are Meta-SGD's learned
    per-parameter rates (used instead of ``settings.lr``). With a single class in ``y`` nothing
    can be cross-validated: θ is kept uncalibrated with threshold 0.5 and ``warnings`` says so.
    """
    st = settings or AdaptationSettings()
    labels = y.detach().to("cpu").numpy().astype(np.int64).reshape(-1)
    if x.shape[0] != labels.shape[0]:
        raise ValueError(f"{x.shape[0]} rows but {labels.shape[0]} labels")
    if labels.size == 0 or not np.isin(labels, (0, 1)).all():
        raise DataError("the adaptation policy needs labelled rows with 0/1 outcomes, got "
                        f"{sorted(set(labels.tolist()))[:5] or 'no rows'}")
    theta = {k: v.detach() for k, v in theta.items()}
    n = int(labels.size)
    counts = (int((labels == 0).sum()), int((labels == 1).sum()))
    if min(counts) == 0:
        return _single_class(model, theta, x, labels, st)
    masks, reps, scheme = cv_folds(labels, st, rng)
    fit_mask = torch.as_tensor(masks, device=x.device)
    s0 = predict_logit(model, theta, x)
    yf = labels.astype(np.float64)
    oofs: dict[Candidate, np.ndarray] = {}
    pool = candidates(st, smaller_class=min(counts))
    for cand in pool:
        if cand.scope == "none":
            oofs[cand] = np.tile(s0, (int(reps.max()) + 1, 1))
        elif cand.scope == "intercept":
            fold_logits = np.stack([s0 + fit_intercept_shift(s0, yf, penalty=cand.proximal, weights=m)
                                    for m in masks])
            oofs[cand] = _oof(fold_logits, masks, reps)
    for scope in sorted({c.scope for c in pool} & {"last", "all"}):
        free = _free_names(model, theta, scope)
        for lam in st.proximal:
            traj, _ = _trajectories(model, theta, free, x, y, fit_mask, lr=st.lr, proximal=lam,
                                    record=st.steps, lrs=lrs)
            for steps, logit_t in traj.items():
                oofs[Candidate(scope, steps, lam)] = _oof(logit_t.to("cpu", torch.float64).numpy(),
                                                          masks, reps)
    losses = {c: _row_losses(o, yf) for c, o in oofs.items()}
    best = min(losses, key=lambda c: (float(losses[c].mean()), c.complexity))
    rows = []
    for c, o in oofs.items():
        diff = losses[c] - losses[best]
        se = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        risk = sigmoid(o)
        rows.append(CVRow(c, float(losses[c].mean()), se, float(((risk - yf) ** 2).mean()), math.nan))
    choice = _select(rows, st.rule)
    # held-out AUROC (a diagnostic, not a criterion) of the rows a report shows: the choice, the
    # three lowest log-losses and "do not adapt"
    shown = {choice, Candidate("none"), *(r.candidate for r in sorted(rows, key=lambda r: r.log_loss)[:3])}
    rows = [replace(r, auroc=auroc(np.tile(labels, len(oofs[r.candidate])), sigmoid(oofs[r.candidate]).ravel()))
            if r.candidate in shown else r for r in rows]
    params = _refit(model, theta, x, y, choice, st, lrs, s0, yf)
    oof_choice = oofs[choice].ravel()
    y_rep = np.tile(labels, len(oofs[choice]))
    method: CalibrationMethod = st.calibration
    warnings: list[str] = []
    if method == "platt" and min(counts) < st.min_calibration_events:
        method = "intercept"
        warnings.append(f"{min(counts)} patients in the smaller class (< "
                        f"{st.min_calibration_events}): intercept-only recalibration instead of Platt")
    calibration = fit_calibration(oof_choice, y_rep, method=method)
    oof_risk = calibration.apply(oof_choice)
    threshold = choose_threshold(y_rep, oof_risk, st.threshold)
    if min(counts) < MIN_EVENTS:
        warnings.append(f"{counts[1]} patients with and {counts[0]} without the outcome: the "
                        "choice, calibration and threshold rest on very few patients")
    log.info("adaptation policy (%s, %d patients, %d with the outcome): %s; calibration %s; "
             "threshold %.3f (%s)", scheme, n, counts[1], choice.text(), calibration.method,
             threshold.value, threshold.policy)
    return AdaptationResult(params, choice, calibration, threshold, tuple(rows), scheme, n, counts,
                            st, oof_risk, tuple(warnings))


def _single_class(model: nn.Module, theta: Params, x: torch.Tensor, labels: np.ndarray,
                  st: AdaptationSettings) -> AdaptationResult:
    """One class only: nothing can be cross-validated or ranked. θ is kept; its risks get an
    intercept-only recalibration toward Platt's smoothed target ``(N + 1)/(N + 2)`` (Laplace's
    rule of succession) unless calibration is off, and the threshold is 0.5."""
    n = int(labels.size)
    counts = (int((labels == 0).sum()), int((labels == 1).sum()))
    s0 = predict_logit(model, theta, x)
    method: CalibrationMethod = "none" if st.calibration == "none" else "intercept"
    calibration = fit_calibration(s0, labels, method=method)
    warning = (f"all {n} labelled patients have outcome {int(labels[0])}: the received model is "
               f"kept ({'intercept recalibrated' if calibration.method == 'intercept' else 'uncalibrated'}"
               "), threshold 0.5; nothing could be cross-validated")
    log.warning("%s", warning)
    return AdaptationResult({k: v.clone() for k, v in theta.items()}, Candidate("none"), calibration,
                            Threshold(0.5, "fixed:0.5", n, counts[1], note="single class"),
                            (), "none (single class)", n, counts, st, calibration.apply(s0), (warning,))


def _refit(model: nn.Module, theta: Params, x: torch.Tensor, y: torch.Tensor, choice: Candidate,
           st: AdaptationSettings, lrs: Params | None, s0: np.ndarray, yf: np.ndarray) -> Params:
    """The chosen candidate fitted on every labelled row."""
    if choice.scope == "none":
        return {k: v.clone() for k, v in theta.items()}
    if choice.scope == "intercept":
        return shift_intercept(model, theta, fit_intercept_shift(s0, yf, penalty=choice.proximal))
    if choice.scope == "all":
        return adapt(model, theta, x, y, InnerConfig(steps=choice.steps, lr=st.lr, proximal=choice.proximal),
                     lrs=lrs)
    free = _free_names(model, theta, choice.scope)
    ones = torch.ones(1, x.shape[0], dtype=torch.bool, device=x.device)
    _, phi = _trajectories(model, theta, free, x, y, ones, lr=st.lr, proximal=choice.proximal,
                           record=[choice.steps], lrs=lrs)
    return {**{k: v.clone() for k, v in theta.items()}, **{k: v[0] for k, v in phi.items()}}


def score_adaptation(model: nn.Module, theta: Params, result: AdaptationResult, x_test: torch.Tensor,
                     y_test: np.ndarray, *, rng: np.random.Generator, n_boot: int = 1000) -> dict[str, Any]:
    """Before/after scores of one site's held-out rows: aggregate numbers only (safe to report).

    ``before``: θ's risks ``σ(s)`` at 0.5; ``after``: the adapted, calibrated risks at 0.5 — the
    three summary keys of :func:`~fedmeta.common.metrics.binary_metrics` each; ``clinical``:
    :func:`~fedmeta.common.clinical.metrics.clinical_metrics` of both (before at 0.5, after at
    the chosen threshold); ``adaptation``: :meth:`AdaptationResult.summary`.
    """
    from fedmeta.common.clinical.metrics import clinical_metrics
    from fedmeta.common.metrics import binary_metrics

    labels = np.asarray(y_test).reshape(-1).astype(np.int64)
    p_before = sigmoid(predict_logit(model, theta, x_test))
    p_after = result.calibration.apply(predict_logit(model, result.params, x_test))
    return {
        "before": binary_metrics(labels, p_before), "after": binary_metrics(labels, p_after),
        "clinical": {
            "before": clinical_metrics(labels, p_before, threshold=0.5, rng=rng, n_boot=n_boot),
            "after": clinical_metrics(labels, p_after, threshold=result.threshold.value, rng=rng, n_boot=n_boot),
        },
        "adaptation": result.summary(), "n_train": result.n, "n_test": int(labels.size),
    }


# --- few-shot draws ---------------------------------------------------------------------------


def stratified_shots(y: np.ndarray, k: int, rng: np.random.Generator, *,
                     classes: Sequence[int] = (0, 1), outcome: str = "the outcome") -> np.ndarray:
    """Indices of ``k`` labelled patients drawn without replacement, every class represented.

    Classes get ``k`` in proportion to their counts (largest remainder), at least one each.
    Raises :class:`DataError` naming the class counts when a class of ``classes`` is absent or
    ``k`` is smaller than the number of classes; with ``k ≥ len(y)`` every row is returned.
    """
    labels = np.asarray(y).reshape(-1).astype(np.int64)
    counts = {c: int((labels == c).sum()) for c in classes}
    shown = ", ".join(f"{c}: {m}" for c, m in counts.items())
    absent = [c for c, m in counts.items() if m == 0]
    if absent:
        raise DataError(f"cannot draw labelled patients with every class of {outcome}: class "
                        f"{absent[0]} is absent (class counts {shown}). Hint: label at least one "
                        "patient of each class before adapting")
    if k < len(classes):
        raise DataError(f"--shots {k}: need at least {len(classes)} patients, one of each class "
                        f"of {outcome} (class counts {shown})")
    if k >= labelled(labels, classes):
        if k > labelled(labels, classes):
            log.warning("asked for %d patients but %d are labelled: using all", k, labelled(labels, classes))
        return rng.permutation(np.flatnonzero(np.isin(labels, classes)))
    total = sum(counts.values())
    share = {c: k * m / total for c, m in counts.items()}
    take = {c: max(1, int(math.floor(share[c]))) for c in classes}
    while sum(take.values()) > k:  # the floor of 1 can overshoot: take back from the largest
        big = max((c for c in classes if take[c] > 1), key=lambda c: take[c])
        take[big] -= 1
    for c in sorted(classes, key=lambda c: share[c] - math.floor(share[c]), reverse=True):
        if sum(take.values()) >= k:
            break
        if take[c] < counts[c]:
            take[c] += 1
    while sum(take.values()) < k:  # a class ran out of rows: fill from the others
        c = next(c for c in classes if take[c] < counts[c])
        take[c] += 1
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), size=take[c], replace=False)
                          for c in classes])
    return rng.permutation(idx)


def repeated_shots(y: np.ndarray, k: int, n_draws: int, rng: np.random.Generator, *,
                   classes: Sequence[int] = (0, 1), outcome: str = "the outcome") -> list[np.ndarray]:
    """``n_draws`` independent :func:`stratified_shots` draws, so that a K-shot evaluation
    reports the mean and spread over draws rather than one lucky (or unlucky) draw."""
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    return [stratified_shots(y, k, rng, classes=classes, outcome=outcome) for _ in range(n_draws)]


def labelled(labels: np.ndarray, classes: Sequence[int]) -> int:
    return int(np.isin(labels, classes).sum())


def describe_shots(y: np.ndarray, *, outcome: str = "the outcome") -> str:
    """``"10 labelled patients: 3 with the outcome, 7 without"`` (what the command prints)."""
    labels = np.asarray(y).reshape(-1)
    pos = int((labels == 1).sum())
    return f"{labels.size} labelled patients: {pos} with {outcome}, {labels.size - pos} without"


# --- metric learners (Prototypical, Matching and Relation Networks) -----------------------------


@dataclass(frozen=True)
class SupportHead:
    """A metric learner's classifier at a site: what it keeps of the site's labelled support set
    (``memory``: prototypes, the embedded support set, class features; see
    :class:`fedmeta.common.meta.episodic.MetricHead`), the class counts, and (binary) a calibration
    of ``s = score₁ − score₀`` and a threshold, fitted on leave-one-out scores."""

    metric: MetricHead
    memory: dict[str, torch.Tensor]
    class_counts: tuple[int, ...]
    calibration: Calibration
    threshold: Threshold | None
    warnings: tuple[str, ...] = ()

    def logits(self, model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Class scores ``(n, C)`` of inputs ``x`` against this support set."""
        with torch.no_grad():
            z = self.metric.embed(model, params, x)
            return self.metric.scores(model, params, z, self.memory)


def support_head(metric: MetricHead, model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, *,
                 n_classes: int = 2, threshold: str = "prevalence") -> SupportHead:
    """The classifier ``metric`` builds from the support set ``(x, y)`` (every class needs a
    support patient).

    Binary: each support patient is also scored by the classifier of the support set without it
    (leave-one-out), and those held-out scores fit the calibration (``metric.calibration``) and
    choose the threshold.
    """
    labels = y.detach().to("cpu").numpy().astype(np.int64).reshape(-1)
    counts = tuple(int((labels == c).sum()) for c in range(n_classes))
    if min(counts) == 0:
        raise DataError(f"a {metric.name} classifier needs a support patient of every class; class counts "
                        f"{dict(enumerate(counts))}")
    with torch.no_grad():
        z = metric.embed(model, params, x)
        onehot = F.one_hot(y.to(z.device), n_classes).to(z.dtype)
        memory = metric.memory(model, params, z, onehot)
    if n_classes != 2:
        return SupportHead(metric, memory, counts, Calibration("none"), None)
    warnings: list[str] = []
    scores = np.full(len(labels), np.nan)
    with torch.no_grad():
        for i in range(len(labels)):
            if counts[int(labels[i])] < 2:
                continue
            keep = torch.arange(len(labels), device=z.device) != i
            lg = metric.scores(model, params, z[i:i + 1], metric.memory(model, params, z[keep], onehot[keep]))[0]
            scores[i] = float(lg[1] - lg[0])
    ok = np.isfinite(scores)
    if ok.sum() < len(labels):
        warnings.append(f"{int((~ok).sum())} support patient(s) alone in their class could not be "
                        "scored out of sample")
    if ok.any() and 0 < labels[ok].sum() < ok.sum():
        method: CalibrationMethod = "platt" if metric.calibration == "platt" else "intercept"
        cal = fit_calibration(scores[ok], labels[ok], method=method)
        thr = choose_threshold(labels[ok], cal.apply(scores[ok]), threshold)
    else:
        cal, thr = Calibration("none", n=int(ok.sum())), Threshold(0.5, "fixed:0.5", note="too few support patients")
        warnings.append("too few support patients per class to calibrate or choose a threshold")
    return SupportHead(metric, memory, counts, cal, thr, tuple(warnings))
