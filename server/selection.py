"""``algorithm: auto``: the coordinator chooses the model by the sites' federated validation log-loss.

Every site carves a validation split out of its training rows (``data.validation_fraction``,
stratified, never touching its test split: :func:`fedmeta.sitecore.data.validation_view`). Each
candidate below is trained on the sites' remaining training rows and scored by the sites on their
validation rows, after each site's own adaptation exactly as in the final evaluation, and the
coordinator adds up what they release: the validation log-loss summed over patients, divided by
their number. Meta-learning candidates are scored every ``selection.every`` rounds, so the number
of rounds is chosen too (early stopping on a fixed schedule). The choice follows the
one-standard-error rule (as the sites' adaptation policy does): the simplest candidate, in the
grid's order, and the fewest rounds whose validation log-loss is within one standard error of the
lowest (the standard error from the sites' means of squared per-patient log-losses). On a few
hundred validation patients the candidates' log-losses differ by less than their noise, and the
rule then keeps the federated logistic regression unless another model is clearly better. The
choice is run on the full training rows and scored on the test split, as any explicit experiment
is. No choice looks at a test label.

Why a small fixed grid and not successive halving: every candidate costs seconds (the federated
GLM is fitted in 5–8 Newton steps, a meta-learning candidate's 30 rounds take about a second in
process), while successive halving would judge meta-learned initialisations after a few rounds,
when they say little about where they end. The grid is stated in :data:`CANDIDATES`, its cost
(candidates × rounds, and wall time) is written with the choice.

The candidates, simplest first, are the model families a statistician would try first and
fedmeta's own: the federated logistic regression with three L2 strengths (scikit-learn's default ``C = 1`` and ten
times weaker and stronger) and with a per-site intercept; Reptile on the linear model and on MLPs
of two sizes; FedAvg on a small MLP. Every score, the choice and the grid go to ``summary.json``
(``selection``) and the run folder's ``selection.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from fedmeta.common.config import AUTO, ExperimentConfig, load_config
from fedmeta.common.errors import ConfigError, FedmetaError

log = logging.getLogger(__name__)

#: name -> the experiment overrides that make the candidate (on top of the run's own settings).
CANDIDATES: dict[str, tuple[str, ...]] = {
    "glm": ("algorithm=glm", "model.name=linear", "glm.l2=1.0"),
    "glm-l2-0.1": ("algorithm=glm", "model.name=linear", "glm.l2=0.1"),
    "glm-l2-10": ("algorithm=glm", "model.name=linear", "glm.l2=10.0"),
    "glm-site-intercept": ("algorithm=glm", "model.name=linear", "glm.l2=1.0", "glm.site_intercept=true"),
    "reptile-linear": ("algorithm=reptile", "model.name=linear"),
    "reptile-mlp-16": ("algorithm=reptile", "model.name=mlp", "model.hidden=[16]"),
    "reptile-mlp-64x64": ("algorithm=reptile", "model.name=mlp", "model.hidden=[64, 64]"),
    "fedavg-mlp-16": ("algorithm=fedavg", "model.name=mlp", "model.hidden=[16]"),
}

RunFn = Callable[..., dict[str, Any]]


def candidate_config(cfg: ExperimentConfig, name: str, *, rounds: int | None = None,
                     validation: bool) -> ExperimentConfig:
    """``cfg`` as candidate ``name``: scored on the validation split (``validation``) or on the
    test split, with ``rounds`` rounds (default: the run's)."""
    if name not in CANDIDATES:
        raise ConfigError(f"selection.candidates: unknown candidate {name!r}; known: {', '.join(CANDIDATES)}")
    base = cfg.to_dict()
    overrides = list(CANDIDATES[name]) + [f"rounds={rounds or cfg.rounds}"]
    if validation:
        overrides += ["data.score_on=validation", "eval.bootstrap=0", "eval.shots=0",
                      f"eval.every={cfg.selection.every}"]
    else:
        overrides += ["eval.every=0"]
    return load_config(None, overrides, base=base)


def pooled_log_loss(sites: Mapping[str, Mapping[str, Any]], names: set[str]) -> tuple[float, int, float]:
    """The log-loss over the validation patients of ``names``, their number, and the standard
    error of that mean (from the sites' means of squared per-patient log-losses, ``loss_sq``;
    NaN when a site did not send it)."""
    total, total_sq, n = 0.0, 0.0, 0
    for name in sorted(names):
        site = sites[name]
        k = int(site["n_test"])
        total += float(site["after"]["loss"]) * k
        total_sq += float(site["after"].get("loss_sq", math.nan)) * k
        n += k
    if not n:
        return math.nan, 0, math.nan
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0)
    return mean, n, math.sqrt(var / n) if math.isfinite(var) and n > 1 else math.nan


def _released(sites: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Sites that released a log-loss and its patient count (a deployed site withholds numbers
    resting on fewer patients than its floor)."""
    return {s: dict(v) for s, v in sites.items()
            if isinstance(v.get("after"), Mapping) and "loss" in v["after"] and "n_test" in v
            and math.isfinite(float(v["after"]["loss"]))}


def _scores_of(summary: Mapping[str, Any], folder: Path) -> dict[int, dict[str, dict[str, Any]]]:
    """Round -> per-site validation results: the interim evaluations in ``rounds.jsonl`` and the
    final one in the summary."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    rounds_file = folder / "rounds.jsonl"
    if rounds_file.exists():
        for line in rounds_file.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("eval"):
                out[int(entry["round"])] = _released(entry["eval"]["sites"])
    out[int(summary["rounds"])] = _released(summary["sites"])  # the GLM: its Newton steps stop by themselves
    return out


def select(grid: Grid, cfg: ExperimentConfig, out_dir: Path, run: RunFn, *,
           say: Callable[[str], None], **run_kwargs: Any) -> dict[str, Any]:
    """Run every candidate on the validation splits, choose, run the choice; returns its summary
    with a ``selection`` entry. ``run`` is :func:`fedmeta.server.driver.run_experiment`."""
    names = list(cfg.selection.candidates or CANDIDATES)
    for name in names:
        candidate_config(cfg, name, validation=True)  # every candidate valid before anything runs
    t0 = time.monotonic()
    say(f"auto: choosing among {len(names)} candidates by the sites' validation log-loss "
        f"({cfg.data.validation_fraction:g} of each site's training rows)")
    results: dict[str, dict[int, dict[str, dict[str, Any]]]] = {}
    errors: dict[str, str] = {}
    candidate_rounds = 0
    for name in names:
        folder = out_dir / "selection" / name
        ccfg = candidate_config(cfg, name, validation=True)
        try:
            summary = run(grid, ccfg, folder, progress=lambda _text: None, **run_kwargs)
        except FedmetaError as e:
            errors[name] = str(e)[:300]
            say(f"auto: candidate {name} failed: {str(e)[:200]}")
            continue
        results[name] = _scores_of(summary, folder)
        candidate_rounds += max(results[name])
    if not results:
        raise FedmetaError("auto: every candidate failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    # score every candidate on the same sites: those that released a validation log-loss to all
    common = set.intersection(*(set(sites) for scores in results.values() for sites in scores.values()))
    if not common:
        # nothing to choose by: every site's validation split is below its patient floor (a site
        # withholds numbers resting on fewer patients). Fall back to the first candidate of the
        # grid, the statistician's default, and say so.
        fallback = next(n for n in names if n in results)
        say(f"auto: no site released a validation log-loss for every candidate (their validation "
            f"splits are below their patient floors); running the first candidate, {fallback}, "
            "without a choice")
        return _run_final(grid, cfg, out_dir, run, say=say, chosen=fallback, rounds=cfg.rounds,
                          selection={"method": "fallback: no validation score was released",
                                     "chosen": fallback, "rounds": cfg.rounds, "candidates": [],
                                     "failed": errors, "sites": [],
                                     "budget": {"candidates": len(names), "candidate_rounds": candidate_rounds,
                                                "wall_s": round(time.monotonic() - t0, 2)}},
                          **run_kwargs)
    table: list[dict[str, Any]] = []
    for name, scores in results.items():
        for rounds, sites in sorted(scores.items()):
            loss, n, se = pooled_log_loss(sites, common)
            aurocs = [a for a in (float(sites[s]["after"].get("auroc", math.nan)) for s in sorted(common))
                      if math.isfinite(a)]  # a one-class validation split has none
            table.append({"candidate": name, "rounds": rounds, "val_log_loss": loss, "val_log_loss_se": se,
                          "val_patients": n,
                          "val_auroc_mean": float(sum(aurocs) / len(aurocs)) if aurocs else math.nan,
                          "overrides": list(CANDIDATES[name])})
    lowest = min(table, key=lambda row: (row["val_log_loss"], names.index(row["candidate"]), row["rounds"]))
    # the one-standard-error rule: the first candidate in the grid's order (simplest first) and its
    # fewest rounds whose validation log-loss is within one standard error of the lowest
    bar = lowest["val_log_loss"] + (lowest["val_log_loss_se"] if math.isfinite(lowest["val_log_loss_se"]) else 0.0)
    best = min((row for row in table if row["val_log_loss"] <= bar),
               key=lambda row: (names.index(row["candidate"]), row["rounds"]))
    for row in table:
        say(f"auto: {row['candidate']:<20} {row['rounds']:>3} rounds: validation log-loss "
            f"{row['val_log_loss']:.4f} ± {row['val_log_loss_se']:.4f} on {row['val_patients']} patients"
            + ("   <- chosen" if row is best else ""))
    say(f"auto: the lowest is {lowest['candidate']} ({lowest['val_log_loss']:.4f}); the choice is the "
        "simplest candidate within one standard error of it")
    selection = {
        "method": "grid over CANDIDATES, scored by validation log-loss after each site's adaptation; "
                  "the simplest within one standard error of the lowest",
        "chosen": best["candidate"], "rounds": best["rounds"], "val_log_loss": best["val_log_loss"],
        "lowest": {"candidate": lowest["candidate"], "rounds": lowest["rounds"],
                   "val_log_loss": lowest["val_log_loss"], "se": lowest["val_log_loss_se"]},
        "sites": sorted(common), "validation_fraction": cfg.data.validation_fraction,
        "candidates": table, "failed": errors,
        "budget": {"candidates": len(names), "candidate_rounds": candidate_rounds,
                   "wall_s": round(time.monotonic() - t0, 2)},
    }
    return _run_final(grid, cfg, out_dir, run, say=say, chosen=best["candidate"], rounds=best["rounds"],
                      selection=selection, **run_kwargs)


def _run_final(grid: Grid, cfg: ExperimentConfig, out_dir: Path, run: RunFn, *, say: Callable[[str], None],
               chosen: str, rounds: int, selection: dict[str, Any], **run_kwargs: Any) -> dict[str, Any]:
    """Run the chosen candidate on the full training rows; record the selection beside it."""
    from fedmeta.server.runfolder import RunFolder

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "selection.json").write_text(json.dumps(selection, indent=2, default=float))
    final_cfg = candidate_config(cfg, chosen, rounds=rounds, validation=False)
    say(f"auto: chose {chosen} ({rounds} rounds); running it on the full training rows and scoring "
        "each site's test split")
    summary = run(grid, final_cfg, out_dir, progress=say, **run_kwargs)
    summary["selection"] = selection
    run_folder = RunFolder(out_dir)
    run_folder.write_json(run_folder.summary, summary)
    # the choice travels with the parameters, so a new hospital's model card says how they were chosen
    theta, meta = run_folder.load_final()
    run_folder.save_final(theta, {**meta, "selection": json.dumps(
        {"chosen": chosen, "rounds": rounds, "val_log_loss": selection.get("val_log_loss", math.nan),
         "lowest": selection.get("lowest"), "settings_tried": len(selection["candidates"])}, default=float)})
    return summary

__all__ = ["AUTO", "CANDIDATES", "candidate_config", "pooled_log_loss", "select"]
