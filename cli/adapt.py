"""``fedmeta adapt``: a new hospital adapts the meta-learned initialisation to its own patients.

Everything runs locally. The site reads the coordinator's ``final.safetensors`` (which carries the
experiment's configuration), checks that its data encode to what the model takes, adapts on its
training split or on ``--shots`` labelled patients (drawn stratified: every class present, or a
refusal), scores its own test split before and after with clinical metrics, and writes a **site
model bundle** (``--out``, default ``adapted-<site>.fedmeta``; :mod:`fedmeta.common.bundle`) with
its model card beside it (``<bundle>.md``). ``fedmeta predict`` applies the bundle to new patients.

Tables adapt by the adaptation policy (:mod:`fedmeta.common.adaptation`): how far to adapt is
chosen by cross-validated log-loss on the site's own labelled rows, then recalibrated, and the
decision threshold set by ``--threshold`` (default ``eval.threshold``: prevalence-matched).
ProtoNets keep the prototypes of the site's labelled patients as the classifier. Images: ``--shots``
counts labelled images **per class**.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fedmeta.common.errors import ConfigError, DataError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapt", help="adapt a meta-learned model to a new hospital's few labelled patients")
    p.add_argument("--params", type=Path, required=True, help="final.safetensors of a fedmeta run")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--site", type=Path, help="this hospital's site.yaml")
    where.add_argument("--site-name", help="a site of the run's data source (e.g. a held-out hospital)")
    p.add_argument("--shots", type=int, default=0,
                   help="adapt on this many labelled patients, drawn stratified (images: per class; "
                        "0: the whole training split)")
    p.add_argument("--outcome", default=None, help="which outcome to adapt to (default: the run's first)")
    p.add_argument("--threshold", default=None,
                   help="decision threshold policy: prevalence, youden, sensitivity:0.9, fixed:0.3 "
                        "(default: eval.threshold)")
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override adaptation settings, e.g. eval.adapt_steps=50")
    p.add_argument("--seed", type=int, default=0, help="which patients are drawn for --shots")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write the site model bundle (.fedmeta); its model card goes beside it")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from fedmeta.common import params as P
    from fedmeta.common.config import config_from_dict, load_config
    from fedmeta.common.data.base import ImageSite
    from fedmeta.sitecore.data import load_adaptation_site

    if args.shots < 0:
        raise ConfigError(f"--shots {args.shots}: must be >= 0")
    state, meta = P.load(args.params)
    if "config" not in meta:
        raise ConfigError(f"{args.params}: carries no experiment config (written by an older fedmeta?)")
    base = config_from_dict(json.loads(str(meta["config"])), where=str(args.params)).to_dict()
    overrides = list(args.overrides) + ["eval.shots=0", "eval.draws=1"]
    if args.threshold is not None:
        overrides.append(f"eval.threshold={args.threshold}")
    cfg = load_config(None, overrides, base=base)
    local = load_adaptation_site(cfg, site_yaml=args.site, site_name=args.site_name)
    rng = np.random.default_rng(args.seed)
    context = {"params": args.params, "meta": meta, "state": state, "cfg": cfg, "local": local, "rng": rng}
    if isinstance(local.site, ImageSite):
        return _images(args, **context)
    return _table(args, **context)


def _model_for(cfg: Any, site: Any, state: Any, *, source: str) -> tuple[Any, Any, Any]:
    """The run's network for this site's data, checked against the run's weights: a table that
    encodes to another width, or images of another shape, get a clear error instead of a shape
    error deep in PyTorch."""
    from fedmeta.common import algorithms
    from fedmeta.common.bundle import ModelSpec, check_input_width, check_params
    from fedmeta.sitecore.data import spec_of

    model_spec = ModelSpec.for_experiment(cfg, spec_of(site))
    model = model_spec.build()
    theta, extra = algorithms.get(cfg.algorithm).split(state)
    features = tuple(getattr(site, "feature_names", ()))
    first = next(iter(dict(model.named_parameters())))
    if features and first in theta and len(theta[first].shape) == 2:
        width = type("RunModel", (), {"in_features": int(theta[first].shape[1])})()
        check_input_width(width, len(features), source=f"site {site.name}", feature_names=features)
    check_params(model, theta, source=f"{source}'s parameters")
    return model, model_spec, (theta, extra)


def _provenance(args: argparse.Namespace, cfg: Any, meta: dict, site: Any) -> Any:
    from fedmeta.common.bundle import Provenance, config_hash

    sites = meta.get("sites") or [s for s in getattr(cfg.data, "sites", ()) or ()]
    algorithm = cfg.algorithm
    if meta.get("selection"):  # chosen by algorithm auto
        sel = json.loads(str(meta["selection"]))
        algorithm = (f"{cfg.algorithm} (chosen by auto as {sel['chosen']}: validation log-loss "
                     f"{float(sel['val_log_loss']):.4f}, the simplest of {sel['settings_tried']} settings "
                     "within one standard error of the lowest)" if sel["settings_tried"] else
                     f"{cfg.algorithm} (auto's first candidate, {sel['chosen']}: no site could release a "
                     "validation score above its patient floor, so nothing was chosen)")
    return Provenance(site=site.name, source_run=str(args.params.resolve()), config_hash=config_hash(cfg.to_json()),
                      algorithm=algorithm, contributing_sites=tuple(str(s) for s in sites),
                      n_labelled=0, class_counts={})


def _default_out(args: argparse.Namespace, site: Any) -> Path:
    return args.out or args.params.with_name(f"adapted-{site.name.replace(' ', '_').replace('/', '_')}.fedmeta")


def _table(args: argparse.Namespace, *, params: Path, meta: dict, state: Any, cfg: Any, local: Any,
           rng: Any) -> int:
    import numpy as np
    import torch

    from fedmeta.cli.model_card import card_path, render_model_card
    from fedmeta.common import algorithms
    from fedmeta.common.adaptation import (
        AdaptationResult,
        SupportHead,
        describe_shots,
        stratified_shots,
    )
    from fedmeta.common.bundle import SiteModelBundle
    from fedmeta.common.clinical.calibration import Calibration
    from fedmeta.common.clinical.thresholds import Threshold
    from fedmeta.common.params import from_numpy
    from fedmeta.sitecore.evaluate import evaluate_outcome
    from fedmeta.sitecore.train import labelled_rows

    site = local.site
    outcome = args.outcome or site.outcomes[0]
    if outcome not in site.outcomes:
        raise DataError(f"--outcome {outcome!r}: site {site.name} labels {list(site.outcomes)}")
    j = site.outcomes.index(outcome)
    model, model_spec, (theta_np, extra_np) = _model_for(cfg, site, state, source=str(params))
    algorithm = algorithms.get(cfg.algorithm)
    x_tr, y_tr = labelled_rows(site, "train", j)
    x_te, y_te = labelled_rows(site, "test", j)
    if len(y_te) == 0:
        raise DataError(f"site {site.name}: no labelled test patient for {outcome}; nothing to score the "
                        "adaptation on")
    if args.shots:
        idx = stratified_shots(y_tr, args.shots, rng, outcome=outcome)
        x_tr, y_tr = x_tr[idx], y_tr[idx]
    print(f"{site.name}: {describe_shots(y_tr, outcome=outcome)}"
          + (f" (drawn stratified from {len(labelled_rows(site, 'train', j)[1])}, seed {args.seed})"
             if args.shots else " (the whole training split)"))
    t0 = time.perf_counter()
    extra = from_numpy(extra_np) if algorithm.evaluation == "learned_rates" else None
    result = evaluate_outcome(cfg, model, from_numpy(theta_np), extra, algorithm=algorithm,
                              x_tr=torch.from_numpy(x_tr), y_tr=y_tr, x_te=torch.from_numpy(x_te), y_te=y_te,
                              outcome=outcome, rng=rng)
    took = time.perf_counter() - t0
    b, a = result.before.values, result.after.values
    adaptation = result.adaptation
    choice = (adaptation.choice.text() if isinstance(adaptation, AdaptationResult)
              else f"{adaptation.metric.text} (the labelled patients)" if isinstance(adaptation, SupportHead)
              else f"fixed: {result.adapt_steps} steps")
    print(f"  adaptation: {choice} ({took:.1f} s)")
    print(f"  scored on {result.n_test} test patients ({result.events} with {outcome}); threshold "
          f"{a['threshold']:.3f} ({cfg.eval.threshold if adaptation is not None else 'fixed:0.5'})")
    for metric in ("auroc", "auprc", "brier", "loss", "accuracy", "sensitivity", "specificity", "ppv", "npv"):
        lo, hi = a.get(f"{metric}.lo"), a.get(f"{metric}.hi")
        ci = f"  [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None and np.isfinite(lo) else ""
        print(f"  {metric:<12} before {b[metric]:.3f}   after {a[metric]:.3f}{ci}")
    for w in result.warnings + result.after.warnings:
        print(f"  warning: {w}")
    prov = _provenance(args, cfg, meta, site)
    metrics = {"test": result.after.clinical, "before": result.before.clinical}
    if isinstance(adaptation, AdaptationResult):
        bundle = SiteModelBundle.from_adaptation(model_spec, None, local.preprocessing, outcome, adaptation,
                                                 prov, id_column=local.id_column, metrics=metrics)
    elif isinstance(adaptation, SupportHead):
        bundle = SiteModelBundle.from_support(model_spec, from_numpy(theta_np), local.preprocessing, outcome,
                                              algorithm.name, adaptation, prov, id_column=local.id_column,
                                              metrics=metrics)
    else:  # eval.adaptation: fixed — the adapted network, uncalibrated, flagged at 0.5
        assert result.params is not None
        counts = {"0": int((y_tr == 0).sum()), "1": int((y_tr == 1).sum())}
        from dataclasses import replace

        bundle = SiteModelBundle(model_spec, {k: v.numpy() for k, v in result.params.items()},
                                 local.preprocessing, outcome, ("0", "1"),
                                 replace(prov, n_labelled=len(y_tr), class_counts=counts),
                                 calibration=Calibration("none"),
                                 threshold=Threshold(0.5, "fixed:0.5", len(y_tr), counts["1"]),
                                 adaptation={"choice": {"scope": "fixed", "steps": result.adapt_steps,
                                                        "text": choice}},
                                 metrics=metrics, id_column=local.id_column)
    return _save(args, bundle, site, render_model_card(bundle, result.after.clinical, before=result.before.clinical),
                 card_path)


def _save(args: argparse.Namespace, bundle: Any, site: Any, card: str, card_path: Any) -> int:
    out = _default_out(args, site)
    path = bundle.save(out)
    card_file = card_path(path)
    card_file.write_text(card)
    print(f"saved {path} (site model bundle) and {card_file} (model card)")
    print(f"next: fedmeta predict --model {path} --data NEW_PATIENTS.csv --out risks.csv")
    return 0


def _images(args: argparse.Namespace, *, params: Path, meta: dict, state: Any, cfg: Any, local: Any,
            rng: Any) -> int:
    """Images: K labelled images per class from the training split; a metric learner (ProtoNet,
    Matching or Relation Network) keeps its classifier of them, a Conv-4 of ``tasks.ways``
    outputs is fine-tuned on them (the site must have exactly that many classes). Scored on the
    whole test split."""
    import numpy as np
    import torch

    from fedmeta.cli.model_card import card_path, render_model_card
    from fedmeta.common import algorithms
    from fedmeta.common.adaptation import support_head
    from fedmeta.common.bundle import SiteModelBundle
    from fedmeta.common.clinical.calibration import Calibration
    from fedmeta.common.meta.inner import adapt
    from fedmeta.common.metrics import multiclass_metrics
    from fedmeta.common.params import from_numpy
    from fedmeta.sitecore.evaluate import fixed_inner

    site = local.site
    model, model_spec, (theta_np, extra_np) = _model_for(cfg, site, state, source=str(params))
    algorithm = algorithms.get(cfg.algorithm)
    classes = list(range(site.n_classes))
    names = tuple(str(c) for c in site.classes)
    k = args.shots or cfg.tasks.support
    counts = np.bincount(site.y_train, minlength=site.n_classes)
    short = [names[c] for c in classes if counts[c] < 1]
    if short:
        raise DataError(f"site {site.name}: no labelled training image of class(es) {short}; every class "
                        "needs at least one")
    idx = np.concatenate([rng.choice(np.flatnonzero(site.y_train == c), size=min(k, int(counts[c])), replace=False)
                          for c in classes])
    used = np.bincount(site.y_train[idx], minlength=site.n_classes)
    print(f"{site.name}: {len(idx)} labelled images, "
          + ", ".join(f"{names[c]}: {int(used[c])}" for c in classes) + f" (up to {k} per class)")
    xs, ys = torch.from_numpy(site.x_train[idx]), torch.from_numpy(site.y_train[idx])
    xq, yq = torch.from_numpy(site.x_test), site.y_test
    theta = from_numpy(theta_np)
    prov = _provenance(args, cfg, meta, site)
    if algorithm.metric is not None:
        head = support_head(algorithm.metric, model, theta, xs, ys, n_classes=site.n_classes,
                            threshold=cfg.eval.threshold)
        logits = head.logits(model, theta, xq).double().numpy()
        scores = multiclass_metrics(yq, logits)
        bundle = SiteModelBundle.from_support(model_spec, theta, local.preprocessing, "class", algorithm.name, head,
                                              prov, classes=names, metrics={"test": scores})
    else:
        outputs = model_spec.kwargs.get("out_features")
        if outputs != site.n_classes:
            raise DataError(f"site {site.name} has {site.n_classes} classes but the run's network has "
                            f"{outputs} outputs (tasks.ways); fine-tuning needs one output per class. "
                            "Hint: use a metric learner's run (protonet, matching, relation), which classifies "
                            "any number of classes")
        lrs = from_numpy(extra_np) if algorithm.evaluation == "learned_rates" else None
        inner = fixed_inner(cfg, learned_rates=lrs is not None)
        phi = theta if inner.steps == 0 else adapt(model, theta, xs, ys, inner, lrs=lrs)
        with torch.no_grad():
            logits = torch.func.functional_call(model, phi, (xq,)).double().numpy()
        scores = multiclass_metrics(yq, logits)
        from dataclasses import replace

        bundle = SiteModelBundle(model_spec, {n: v.numpy() for n, v in phi.items()}, local.preprocessing, "class",
                                 names, replace(prov, n_labelled=len(idx),
                                                class_counts={names[c]: int(used[c]) for c in classes}),
                                 calibration=Calibration("none"),
                                 adaptation={"choice": {"scope": "all", "steps": inner.steps,
                                                        "text": f"{inner.steps} steps of {inner.lr}"}},
                                 metrics={"test": scores})
    print(f"  scored on {len(yq)} test images: accuracy {scores['accuracy']:.3f}, macro AUROC "
          f"{scores['auroc']:.3f}")
    return _save(args, bundle, site, render_model_card(bundle, None), card_path)
