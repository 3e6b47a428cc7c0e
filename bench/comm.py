"""Benchmark 5: bytes on the wire to reach FedAvg's final accuracy on Fed-Heart-Disease.

The question of FedMeta (Chen et al. 2018, "Federated Meta-Learning with Fast Convergence and
Efficient Communication", which reports 2.8-4.3x less communication than FedAvg): how many bytes
must cross the network before the hospitals have a model as good as the one FedAvg ends with?

Setting: benchmark 1's protocol (four hospitals, each scored on its own test split, unweighted
mean), an MLP 13-64-64-2 (5,186 parameters; fedmeta's default network, fixed a priori: with
logistic regression's 28 parameters compression headers would dominate), 30 rounds. After every
round the checkpointed global state is scored (:func:`fedmeta.bench.flamby.curve_fn`): the global
model as is (``before``) and after each hospital's local adaptation (``after``).

Targets (per seed): ``FedAvg final`` = FedAvg's global-model accuracy after its last round (the
quantity FedMeta compares against), and the stricter ``FedAvg + FT final`` = FedAvg's model after
the same local fine-tuning. Bytes = cumulative ``bytes_up + bytes_down`` (parameter payload of every
message, as counted by the coordinator) up to the first round whose accuracy reaches the target;
FedAvg's own cost is counted the same way on its own curve. Compression: ``fp16``, ``int8`` and
``topk`` (10 %, error feedback) of the sites' replies; with ``downlink=delta`` (when the installed
config supports it) the broadcasts are encoded deltas too.

Caveat stated in the report: with local adaptation even one round of any method already beats
FedAvg's global model here, and so does local training with zero bytes; the stricter target is
the informative one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedmeta.bench import flamby, plots, runner
from fedmeta.bench import rows as R
from fedmeta.common.config import CompressionConfig
from fedmeta.common.data.heart import HOSPITALS

log = logging.getLogger(__name__)

BENCH = "comm"
#: Sites adapt as the product does by default (the adaptation policy of
#: :func:`fedmeta.common.adaptation.adapt_with_policy`). The published run was made when each site
#: chose only its number of steps by held-out log-loss (commit e186990); the bytes do not depend on
#: the adaptation, the final accuracies may differ slightly.
BASE: tuple[str, ...] = (*flamby.BASE, "model.name=mlp", "rounds=30")
ALGORITHMS: dict[str, str] = {
    "fedavg": "FedAvg", "reptile": "fedmeta Reptile", "fomaml": "fedmeta FOMAML", "maml": "fedmeta MAML",
    "metasgd": "fedmeta Meta-SGD",
}
COMPRESSIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("none", ("compression.method=none",)),
    ("fp16", ("compression.method=fp16",)),
    ("int8", ("compression.method=int8",)),
    ("topk10%", ("compression.method=topk", "compression.topk_fraction=0.1")),
)
DOWNLINK = "downlink" in CompressionConfig.model_fields
if DOWNLINK:
    COMPRESSIONS += (("int8+delta-down", ("compression.method=int8", "compression.downlink=delta")),
                     ("topk10%+delta-down", ("compression.method=topk", "compression.topk_fraction=0.1",
                                             "compression.downlink=delta")))


#: Compressions drawn in the bytes-vs-accuracy plot for the meta-learners (all are in the table).
PLOTTED = ("none", "int8", "topk10%+delta-down")


def settings(quick: bool) -> tuple[list[int], int, dict[str, str], tuple[tuple[str, tuple[str, ...]], ...]]:
    """(seeds, rounds, algorithms, compressions)."""
    if quick:
        return [0], 2, {"fedavg": "FedAvg", "reptile": "fedmeta Reptile"}, COMPRESSIONS[:3:2]
    return [0, 1], 30, ALGORITHMS, COMPRESSIONS


def run_plotted_subset(out_dir: Path) -> list[R.Row]:
    """Seed 0 of the full benchmark for the compressions in :data:`PLOTTED` only, into
    ``out_dir/plotted-subset``: its plots (and ``comm_curves.json``) are the ones published, since
    the full run's plot of every compression is unreadable. Same seeds, so the same curves."""
    subset = tuple(c for c in COMPRESSIONS if c[0] in PLOTTED)
    full = settings

    def only_subset(quick: bool) -> tuple[list[int], int, dict[str, str], tuple[tuple[str, tuple[str, ...]], ...]]:
        _, rounds, algorithms, _ = full(quick)
        return [0], rounds, algorithms, subset

    globals()["settings"] = only_subset
    try:
        return run(quick=False, out_dir=out_dir / "plotted-subset")
    finally:
        globals()["settings"] = full


def bytes_to_reach(curve: list[dict], key: str, target: float) -> tuple[float | None, int | None]:
    """Cumulative bytes (up + down) and the round at which ``curve[key]`` first reaches ``target``."""
    total = 0.0
    for r in curve:
        total += float(r["bytes_up"]) + float(r["bytes_down"])
        v = r.get(key)
        if v is not None and v >= target - 1e-12:
            return total, int(r["round"])
    return None, None


def run(*, quick: bool, out_dir: Path) -> list[R.Row]:
    """Run benchmark 5; rows of bytes-to-target and final accuracy per method and compression."""
    runner.quiet()
    seeds, rounds, algorithms, compressions = settings(quick)
    timer = R.Timer()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{BENCH}.md").write_text("")
    per_seed: list[R.Row] = []
    curves: dict[str, list[dict]] = {}
    for seed in seeds:
        runs: dict[tuple[str, str], list[dict]] = {}
        for algo in algorithms:
            for comp, overrides in compressions:
                cfg = runner.config([*BASE, f"algorithm={algo}", *overrides, f"rounds={rounds}", f"seed={seed}"])
                fn = flamby.curve_fn(cfg, runner.load_sites(cfg, HOSPITALS))
                _, _, log_rounds = runner.run_federated(cfg, out_dir / "runs" / f"{algo}-{comp}-s{seed}", curve=fn)
                runs[(algo, comp)] = log_rounds
        ref = runs[("fedavg", "none")]
        targets = {"FedAvg final": ref[-1]["before_accuracy"], "FedAvg + FT final": ref[-1]["after_accuracy"]}
        for (algo, comp), log_rounds in runs.items():
            label = f"{algorithms[algo]} [{comp}]"
            if seed == seeds[0]:
                curves[label] = log_rounds
            for tname, target in targets.items():
                # FedAvg is scored as FedAvg delivers it (global model) for the first target, and
                # fine-tuned for the second; the meta-learners always after local adaptation.
                key = "before_accuracy" if algo == "fedavg" and tname == "FedAvg final" else "after_accuracy"
                b, rnd = bytes_to_reach(log_rounds, key, target)
                ref_key = "before_accuracy" if tname == "FedAvg final" else "after_accuracy"
                b_ref, _ = bytes_to_reach(ref, ref_key, target)
                per_seed.append(R.row(BENCH, label, f"bytes_to[{tname}]", b, site="mean", seed=seed,
                                      target=target, round=rnd))
                per_seed.append(R.row(BENCH, label, f"reduction_vs_fedavg[{tname}]",
                                      (b_ref / b) if (b and b_ref) else None, site="mean", seed=seed))
            total = sum(float(r["bytes_up"]) + float(r["bytes_down"]) for r in log_rounds)
            final_key = "before_accuracy" if algo == "fedavg" else "after_accuracy"
            per_seed.append(R.row(BENCH, label, "final_accuracy", log_rounds[-1][final_key], site="mean", seed=seed))
            per_seed.append(R.row(BENCH, label, "total_bytes", total, site="mean", seed=seed))
    rows = R.aggregate_seeds(per_seed, by=("method", "metric", "site"))
    rows.append(R.row(BENCH, "local training (no communication)", "total_bytes", 0.0, site="mean"))
    rows.append(R.row(BENCH, "all", "runtime_s", timer(), site="mean", seeds=len(seeds), rounds=rounds))
    _report(rows, curves, out_dir, quick=quick)
    R.save_rows(rows, out_dir / f"{BENCH}.json")
    curve_rows = [R.row(BENCH, label, key, r.get(key), site="mean", round=int(r["round"]), seed=seeds[0],
                        bytes=float(r["bytes_up"]) + float(r["bytes_down"]))
                  for label, log_rounds in curves.items() for r in log_rounds
                  for key in ("before_accuracy", "after_accuracy")]
    R.save_rows(curve_rows, out_dir / f"{BENCH}_curves.json")
    return rows


def _report(rows: list[R.Row], curves: dict[str, list[dict]], out_dir: Path, *, quick: bool) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] not in ("all",)))
    metrics = ["final_accuracy", "total_bytes", "bytes_to[FedAvg final]", "reduction_vs_fedavg[FedAvg final]",
               "bytes_to[FedAvg + FT final]", "reduction_vs_fedavg[FedAvg + FT final]"]
    cell = {(r["method"], r["metric"]): r for r in rows}
    lines = ["**Communication on Fed-Heart-Disease (MLP, mean over seeds; '–': target never reached)**", "",
             "| method [compression] | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for m in methods:
        cells = []
        for k in metrics:
            r = cell.get((m, k))
            if r is None or r["value"] is None:
                cells.append("–")
            elif k.startswith("bytes") or k == "total_bytes":
                cells.append(f"{r['value']:,.0f}")
            elif k.startswith("reduction"):
                cells.append(f"{r['value']:.1f}x" + (f" (n={r['n']})" if r.get("n", 1) > 1 else ""))
            else:
                cells.append(f"{r['value']:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    R.emit("\n".join(lines), out_dir, BENCH)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for label, log_rounds in curves.items():
        fedavg = label.startswith("FedAvg")
        if not label.endswith("[none]") and (fedavg or not any(label.endswith(f"[{c}]") for c in PLOTTED)):
            continue  # keep the plot readable: the other compressions are in the table
        key = "before_accuracy" if label.startswith("FedAvg") else "after_accuracy"
        xs, ys, total = [], [], 0.0
        for r in log_rounds:
            total += float(r["bytes_up"]) + float(r["bytes_down"])
            xs.append(total)
            ys.append(r[key])
        series[label] = (xs, ys)
        if label.startswith("FedAvg"):
            series[label.replace("FedAvg", "FedAvg + FT")] = (xs, [r["after_accuracy"] for r in log_rounds])
    plots.plot_lines(series, out_dir / "comm_bytes_vs_accuracy.png", xlabel="cumulative bytes (up + down)",
                 ylabel="mean test accuracy (4 hospitals)", logx=True,
                 title="Bytes vs accuracy, seed 0" + (" [quick]" if quick else ""))
    plots.plot_lines({k: ([r["round"] for r in v], [r["after_accuracy" if not k.startswith("FedAvg") else
                                                    "before_accuracy"] for r in v])
                   for k, v in curves.items() if k.endswith("[none]")},
                 out_dir / "comm_learning_curves.png", xlabel="round", ylabel="mean test accuracy",
                 title="Learning curves (uncompressed), seed 0")
