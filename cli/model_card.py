"""The model card written beside each site-model bundle (Markdown).

Follows the sections of Mitchell et al. 2019, "Model Cards for Model Reporting" (FAT* '19),
narrowed to what a hospital needs before using a risk model: intended use, the data and sites
behind it, how it was adapted, metrics with 95 % intervals and the number of patients behind
each, calibration, the decision threshold and its policy, and its limits (small n, missing
classes, fewer than 10 events behind a number).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmeta.common.bundle import SiteModelBundle
from fedmeta.common.clinical.metrics import METRICS, MIN_EVENTS

_LABELS = {
    "prevalence": "prevalence", "auroc": "AUROC", "auprc": "AUPRC", "brier": "Brier score",
    "log_loss": "log-loss", "calibration_intercept": "calibration intercept (ideal 0)",
    "calibration_slope": "calibration slope (ideal 1)", "ece": "expected calibration error",
    "sensitivity": "sensitivity", "specificity": "specificity", "ppv": "PPV", "npv": "NPV",
    "accuracy": "accuracy",
}
SMALL_N = 50


def fmt(v: Any, digits: int = 3) -> str:
    """A number as printed on the card (``undefined`` for NaN / None)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "undefined"
    if isinstance(v, int):
        return str(v)
    return f"{float(v):.{digits}f}"


def _interval(m: Mapping[str, Any]) -> str:
    lo, hi = m.get("lo"), m.get("hi")
    if fmt(lo) == "undefined" or fmt(hi) == "undefined":
        return "–"
    return f"{fmt(lo)} – {fmt(hi)}"


def metrics_table(metrics: Mapping[str, Any], *, before: Mapping[str, Any] | None = None) -> list[str]:
    """Markdown rows: metric, value, 95 % interval, patients behind it (and the unadapted value)."""
    head = "| metric | value | 95 % interval | n behind it |" + (" before adaptation |" if before else "")
    rows = [head, "|---|---|---|---|" + ("---|" if before else "")]
    for key in ("prevalence", *METRICS):
        m = metrics.get(key)
        if not isinstance(m, Mapping):
            continue
        line = f"| {_LABELS[key]} | {fmt(m.get('value'))} | {_interval(m)} | {fmt(m.get('basis'))} |"
        if before:
            b = before.get(key)
            line += f" {fmt(b.get('value')) if isinstance(b, Mapping) else '–'} |"
        rows.append(line)
    return rows


def _limits(bundle: SiteModelBundle, metrics: Mapping[str, Any] | None) -> list[str]:
    out: list[str] = []
    prov = bundle.provenance
    counts = dict(prov.class_counts)
    if prov.n_labelled < SMALL_N:
        out.append(f"Adapted on only {prov.n_labelled} labelled patients (class counts "
                   f"{', '.join(f'{k}: {v}' for k, v in counts.items())}); its choices and its "
                   "calibration are uncertain.")
    absent = [k for k, v in counts.items() if v == 0]
    if absent:
        out.append(f"No labelled patient of class(es) {', '.join(absent)} at this site: the model "
                   "could not be checked or calibrated against them.")
    small = [k for k, v in counts.items() if 0 < v < MIN_EVENTS]
    if small:
        out.append(f"Fewer than {MIN_EVENTS} labelled patients in class(es) {', '.join(small)}.")
    for w in bundle.adaptation.get("warnings", []) or []:
        out.append(f"Adaptation: {w}.")
    if metrics is not None:
        for w in metrics.get("warnings", []) or []:
            out.append(f"Evaluation: {w}.")
    else:
        out.append("No held-out evaluation is attached to this card.")
    per_patient = [k for k, v in bundle.memory.items() if prov.n_labelled > len(bundle.classes)
                   and len(v) == prov.n_labelled]
    if per_patient:
        out.append(f"The file keeps one row per labelled patient ({', '.join(f'head/{k}' for k in per_patient)}: "
                   f"its classifier is {bundle.adaptation.get('choice', {}).get('text', bundle.head)}); "
                   "store and share it as you would those patients' data.")
    out.append("Validated only at this site and for patients like those it was adapted on; "
               "re-check calibration before use elsewhere or after practice changes.")
    return out


def render_model_card(bundle: SiteModelBundle, metrics: Mapping[str, Any] | None = None, *,
                      before: Mapping[str, Any] | None = None,
                      evaluated_on: str = "the site's held-out test split") -> str:
    """The Markdown model card of ``bundle``.

    ``metrics``: :func:`~fedmeta.common.clinical.metrics.clinical_metrics` of the bundle's risks
    on held-out patients (``evaluated_on`` says which); ``before``: the same for the unadapted
    model, shown beside it. Every number given appears on the card as ``fmt`` prints it.
    """
    p = bundle.provenance
    adapt = bundle.adaptation or {}
    choice = adapt.get("choice", {}) if isinstance(adapt.get("choice"), Mapping) else {}
    lines = [f"# Model card: {bundle.outcome} at {p.site}", ""]
    lines += ["## Intended use", ""]
    if bundle.binary:
        assert bundle.threshold is not None
        lines += [f"Estimates the risk of **{bundle.outcome}** for patients of {p.site} like those "
                  "it was adapted on, to support — not replace — clinical judgement. A patient is "
                  f"flagged when the risk is at least **{fmt(bundle.threshold.value)}** "
                  f"(threshold policy `{bundle.threshold.policy}`).", ""]
    else:
        lines += [f"Classifies images of {p.site} into {', '.join(bundle.classes)} "
                  f"(outcome {bundle.outcome}), to support — not replace — clinical reading.", ""]
    lines += ["Not intended for other hospitals without re-adaptation, for populations unlike the "
              "site's labelled patients, or as the sole basis of a decision.", ""]
    lines += ["## Model and data", "",
              f"- Network: `{bundle.model.name}` {dict(bundle.model.kwargs)}; head: {bundle.head}",
              f"- Meta-learned by `{p.algorithm}` across {len(p.contributing_sites)} site(s): "
              f"{', '.join(p.contributing_sites) or 'not recorded'}",
              f"- Source run: `{p.source_run}` (config sha256 `{p.config_hash[:16]}…`)",
              f"- Preprocessing: {bundle.preprocessing.describe()}",
              f"- Labelled patients at {p.site}: {p.n_labelled} ("
              + ", ".join(f"class {k}: {v}" for k, v in dict(p.class_counts).items()) + ")",
              f"- fedmeta {p.fedmeta_version}, torch {p.torch_version}; created {p.created}", ""]
    lines += ["## Adaptation", ""]
    if choice:
        lines.append(f"- Chosen: **{choice.get('text', choice.get('scope'))}**"
                     + (f", by cross-validation ({adapt.get('scheme')}) on log-loss, rule "
                        f"`{adapt.get('rule')}`" if adapt.get("scheme") else ""))
    cv = adapt.get("cv") or []
    if cv:
        best = sorted(cv, key=lambda r: (r.get("log_loss") is None, r.get("log_loss") or 0.0))[:3]
        keep = {(r["scope"], r["steps"], r["proximal"]) for r in best}
        keep.add(("none", 0, 0.0))
        lines += ["", "| candidate | held-out log-loss | ± SE | held-out AUROC |", "|---|---|---|---|"]
        for r in cv:
            if (r["scope"], r["steps"], r["proximal"]) in keep:
                name = {"none": "do not adapt", "intercept": f"intercept only (λ = {r['proximal']:g})"}.get(
                    r["scope"], f"{r['scope']}, {r['steps']} steps (λ = {r['proximal']:g})")
                lines.append(f"| {name} | {fmt(r.get('log_loss'))} | "
                             f"{fmt(r.get('se'))} | {fmt(r.get('auroc'))} |")
    lines.append("")
    cal = bundle.calibration
    lines += ["## Calibration", "",
              f"Risks are `σ(a + b·s)` of the network's positive-class logit `s` with a = "
              f"{fmt(cal.a)}, b = {fmt(cal.b)} ({cal.method}"
              + (f", fitted on {cal.n} held-out predictions with {cal.events} events" if cal.n else "")
              + ")." + (f" {cal.note}." if cal.note else ""), ""]
    if metrics is not None:
        for key in ("calibration_intercept", "calibration_slope", "ece"):
            m = metrics.get(key, {})
            lines.append(f"- {_LABELS[key]}: {fmt(m.get('value'))} ({_interval(m)})")
        lines.append("")
    if bundle.threshold is not None:
        t = bundle.threshold
        lines += ["## Decision threshold", "",
                  f"{fmt(t.value)} by policy `{t.policy}`, chosen on {t.n} out-of-fold risks "
                  f"({t.events} events): sensitivity {fmt(t.sensitivity)}, specificity "
                  f"{fmt(t.specificity)} there." + (f" {t.note}." if t.note else ""), ""]
    lines += ["## Performance", ""]
    if metrics is not None:
        lines += [f"On {evaluated_on}: {fmt(metrics.get('n'))} patients, {fmt(metrics.get('events'))} "
                  f"events; intervals from {fmt(metrics.get('n_boot'))} stratified bootstrap resamples.", ""]
        lines += metrics_table(metrics, before=before)
    else:
        lines.append("No held-out evaluation attached.")
    lines += ["", "## Limits", ""] + [f"- {w}" for w in _limits(bundle, metrics)]
    return "\n".join(lines) + "\n"


def card_path(bundle_path: str | Path) -> Path:
    """Where the card goes: beside the bundle, ``<bundle>.md``."""
    p = Path(bundle_path)
    return p.with_name(p.name + ".md")
