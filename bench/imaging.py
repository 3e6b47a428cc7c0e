"""Benchmark 4: synthetic multi-site imaging, 5-way 5-shot on novel classes at held-out sites.

Data: ``configs/imaging-synth.yaml`` (:mod:`fedmeta.common.data.synth_images`): 10 sites, each with
its own scanner, 28x28 grey images of 12 classes of which 5 (chosen with ``data.split_seed``) are
*novel*: never seen in training. Two sites (:data:`HELD_OUT`) take no part in training; each scores
:data:`EPISODES` 5-way 5-shot episodes (10 queries per class: the test split holds 15 images per class) drawn from its novel classes' test
images, the same episodes for every method.

Methods (all on the same Conv-4, 32 channels, trained 20 rounds, half the sites per round):

- ``FedProto``: federated prototypical networks (Snell et al. 2017), prototypes from the 5 shots;
- ``Fed Matching Networks`` (Vinyals et al. 2016): attention over the 25 embedded shots; ``(FCE)``
  with the paper's full context embeddings;
- ``Fed Relation Networks`` (Sung et al. 2018): their own Conv-4 (pooling in two blocks) and a
  relation module scoring the summed embeddings of each class's 5 shots; in 20 rounds (20 outer
  steps) its training loss settles at 0.16, the loss of the constant answer 1/5 for every class,
  so it also runs 200 rounds (chosen on that training loss, which leaves the plateau after about
  80 rounds; no held-out episode was used to choose it);
- ``FedMAML (first order)``: FOMAML (Finn et al. 2017), adapted on the 5 shots; first order
  because second-order Conv-4 meta-gradients are ~3x slower on CPU (``fedmeta bench engine``);
- ``FedAvg + fine-tuning``: FedAvg (McMahan et al. 2017) trained as a plain classifier of the 7
  meta-training classes (``tasks.ways = 7``: fedmeta's FedAvg client trains on a site's raw
  labels, which a 5-output head cannot hold), then, as the "Baseline" of Chen et al. 2019 ("A
  Closer Look at Few-shot Classification"), a new zero-initialised 5-way head and fine-tuning of
  the whole network on the 5 shots.

Adaptation for both gradient methods: ``eval.adapt_steps`` = 20 steps of ``eval.adapt_lr`` = 0.05
from the config (fixed before these runs). Nothing is tuned here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fedmeta.bench import plots, runner
from fedmeta.bench import rows as R
from fedmeta.common import algorithms
from fedmeta.common.data.episodes import EpisodeSampler
from fedmeta.common.data.images import load_novel_site
from fedmeta.common.experiment import build_model_for
from fedmeta.common.meta.inner import adapt
from fedmeta.common.meta.types import InnerConfig
from fedmeta.common.metrics import multiclass_metrics
from fedmeta.common.params import NDArrays, from_numpy

log = logging.getLogger(__name__)

BENCH = "imaging"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "imaging-synth.yaml"
HELD_OUT: tuple[str, ...] = ("site-09", "site-10")
EPISODES = 50
WAYS, SHOTS, QUERIES = 5, 5, 10
BASE_CLASSES = 7
#: Training sites answer in each round; the driver's own evaluation of the training sites is not
#: used here, so it is kept to one adaptation step (it would otherwise dominate the runtime).
BASE: tuple[str, ...] = ("data.holdout=[site-09,site-10]", "federation.min_nodes=3", "eval.adapt_steps=1")
METHODS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("protonet", "FedProto", ("algorithm=protonet",)),
    ("matching", "Fed Matching Networks", ("algorithm=matching",)),
    ("matching-fce", "Fed Matching Networks (FCE)", ("algorithm=matching-fce",)),
    ("relation", "Fed Relation Networks", ("algorithm=relation",)),
    ("relation-200", "Fed Relation Networks, 200 rounds", ("algorithm=relation", "rounds=200")),
    ("fomaml", "FedMAML (first order)", ("algorithm=fomaml", "outer.optimizer=adam", "outer.lr=0.001")),
    ("fedavg", "FedAvg + fine-tuning", ("algorithm=fedavg", f"tasks.ways={BASE_CLASSES}", "outer.optimizer=sgd",
                                        "outer.lr=1.0")),
)
ADAPT_STEPS, ADAPT_LR = 20, 0.05


def settings(quick: bool) -> tuple[list[int], int, int, tuple[str, ...]]:
    """(training seeds, rounds, episodes per held-out site, methods)."""
    if quick:
        return [0], 1, 2, ("protonet", "relation", "fedavg")
    return [0, 1, 2], 20, EPISODES, tuple(m[0] for m in METHODS)


def _new_head(params: dict[str, torch.Tensor], ways: int) -> dict[str, torch.Tensor]:
    """A zero-initialised ``ways``-way head on the trained features (Chen et al. 2019)."""
    out = dict(params)
    out["head.weight"] = torch.zeros(ways, params["head.weight"].shape[1])
    out["head.bias"] = torch.zeros(ways)
    return out


def check_methods(keys: tuple[str, ...]) -> None:
    """Refuse method keys this benchmark does not have (before anything runs)."""
    unknown = [k for k in keys if k not in {m[0] for m in METHODS}]
    if unknown:
        raise ValueError(f"--methods: unknown method {unknown[0]!r}; this benchmark has "
                         f"{', '.join(m[0] for m in METHODS)}")


def run(*, quick: bool, out_dir: Path, methods: tuple[str, ...] | None = None) -> list[R.Row]:
    """Run benchmark 4: few-shot accuracy per held-out site and the mean (``methods``: only those,
    by key; the same seeds and episodes as a full run)."""
    if methods:
        check_methods(methods)
    runner.quiet()
    seeds, rounds, n_episodes, keys = settings(quick)
    if methods:
        keys = tuple(k for k in keys if k in methods) if quick else tuple(methods)
    timer = R.Timer()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{BENCH}.md").write_text("")
    per_seed: list[R.Row] = []
    base = [*BASE, f"rounds={rounds}"]
    if quick:  # three training sites, all of them each round
        base += ["data.sites=[site-01,site-02,site-03]", "federation.fraction=1.0"]
    eval_cfg = runner.config([*base, "algorithm=fomaml"], CONFIG)
    eval_model = build_model_for(eval_cfg, runner.spec_of(eval_cfg))  # 5-way head, for FedAvg's new head
    episodes = {}
    for si, name in enumerate(HELD_OUT):
        site = load_novel_site(eval_cfg.data, name)
        sampler = EpisodeSampler(site.x_test, site.y_test, n_way=WAYS, k_shot=SHOTS, n_query=QUERIES)
        episodes[name] = sampler.sample(n_episodes, rng=np.random.default_rng([si, 4243]))
    curves: dict[str, list[dict]] = {}
    for seed in seeds:
        for key, label, overrides in METHODS:
            if key not in keys:
                continue
            cfg = runner.config([*base, *overrides, f"seed={seed}"], CONFIG)
            t = R.Timer()
            _, state, log_rounds = runner.run_federated(cfg, out_dir / "runs" / f"{key}-s{seed}", own_evaluation=True)
            if seed == seeds[0]:
                curves[label] = log_rounds
            train_s = t()
            model = eval_model if key == "fedavg" else build_model_for(cfg, runner.spec_of(cfg))
            per_seed += _score_episodes(key, label, cfg.algorithm, state, model, episodes, seed=seed)
            per_seed.append(R.row(BENCH, label, "train_s", train_s, site="mean", rounds=rounds, seed=seed))
    # mean ± std over training seeds (each value a mean over the site's episodes)
    rows = R.aggregate_seeds(per_seed)
    rows.append(R.row(BENCH, "all", "runtime_s", timer(), site="mean", rounds=rounds, episodes=n_episodes))
    R.emit(R.pivot_table(rows, metric="accuracy", columns=[*HELD_OUT, "mean"],
                         title=f"Synthetic imaging: {WAYS}-way {SHOTS}-shot accuracy on novel classes at "
                               f"held-out sites ({n_episodes} episodes per site, {len(seeds)} training seed(s); "
                               "± std over seeds; chance 0.2)"),
           out_dir, BENCH)
    series = {label: ([r["round"] for r in lr], [r["query_loss_after"] or float("nan") for r in lr])
              for label, lr in curves.items()}
    plots.plot_lines(series, out_dir / "imaging_training_loss.png", xlabel="round",
                 ylabel="mean query loss reported by the sites (after adaptation)",
                 title="Synthetic imaging: training curves" + (" [quick]" if quick else ""))
    means = {r["method"]: r["value"] for r in rows if r["metric"] == "accuracy" and r["site"] == "mean"}
    plots.plot_bars(means, out_dir / "imaging_accuracy.png", ylabel="5-way 5-shot accuracy (novel classes)",
                title="Synthetic imaging, held-out sites")
    R.save_rows(rows, out_dir / f"{BENCH}.json")
    return rows


def _score_episodes(key: str, label: str, algorithm: str, state: NDArrays, eval_model: torch.nn.Module,
                    episodes: dict, *, seed: int) -> list[R.Row]:
    """One training seed's accuracy per held-out site (mean over its episodes) and their mean."""
    params = from_numpy(state)
    metric = algorithms.get(algorithm).metric
    if key == "fedavg":
        params = _new_head(params, WAYS)
    rows: list[R.Row] = []
    for name, eps in episodes.items():
        accs = []
        for i in range(eps.n_tasks):
            xs, ys, xq, yq = eps.xs[i], eps.ys[i], eps.xq[i], eps.yq[i].numpy()
            if metric is not None:
                with torch.no_grad():
                    logits = metric.logits(eval_model, params, xs, ys, xq, n_way=WAYS)
            else:
                phi = adapt(eval_model, params, xs, ys, InnerConfig(steps=ADAPT_STEPS, lr=ADAPT_LR))
                with torch.no_grad():
                    logits = torch.func.functional_call(eval_model, phi, (xq,))
            accs.append(multiclass_metrics(yq, logits.double().numpy())["accuracy"])
        rows.append(R.row(BENCH, label, "accuracy", float(np.mean(accs)), site=name, k=SHOTS, seed=seed,
                          episodes=len(accs)))
    site_means = [r["value"] for r in rows]
    rows.append(R.row(BENCH, label, "accuracy", float(np.mean(site_means)), site="mean", k=SHOTS, seed=seed))
    return rows
