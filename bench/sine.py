"""Sine-regression quality benchmark (Finn et al. 2017, §5.1): is meta-learning actually learning?

Three initialisations of the same MLP (1-40-40-1, ReLU) are each adapted to held-out sine tasks
from ``k_shot`` = 10 points with the same inner loop (plain SGD steps on the support MSE), and
scored by the mean squared error on 100 query points per task:

- ``meta-learned``: MAML-trained initialisation (second order; Adam on the meta-gradient);
- ``random``: the untrained initialisation;
- ``joint``: trained with Adam on the pooled examples of all training tasks (the "pretrained"
  baseline of Finn et al.), which learns roughly the mean function.

``fedmeta bench sine`` is not wired into the CLI; :func:`run` follows the bench interface and
``fedmeta.bench.engine.run`` includes these rows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedmeta.bench.sine_tasks import sample_sine_tasks
from fedmeta.common.meta.evaluate import adapt_and_evaluate
from fedmeta.common.meta.inner import forward, task_loss
from fedmeta.common.meta.maml import maml_step
from fedmeta.common.meta.types import InnerConfig, Params
from fedmeta.common.models import build_model, init_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SineSettings:
    meta_iters: int = 1500
    meta_batch: int = 16
    k_shot: int = 10
    n_query: int = 10
    train_inner: InnerConfig = InnerConfig(steps=1, lr=0.02)
    eval_inner: InnerConfig = InnerConfig(steps=10, lr=0.02)
    outer_lr: float = 2e-3
    eval_tasks: int = 200
    eval_query: int = 100
    seed: int = 0


def _adam(params: Params, lr: float) -> tuple[Params, torch.optim.Adam]:
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    return leaves, torch.optim.Adam(leaves.values(), lr=lr)


def evaluate(model: torch.nn.Module, params: Params, s: SineSettings, *, seed: int) -> float:
    """Mean query MSE over held-out tasks after ``s.eval_inner`` adaptation on ``k_shot`` points."""
    batch, _, _ = sample_sine_tasks(
        s.eval_tasks, k_shot=s.k_shot, n_query=s.eval_query, rng=np.random.default_rng(seed)
    )
    stats = adapt_and_evaluate(model, params, batch, s.eval_inner, loss="mse")
    return stats.mean_loss_after


def compare(s: SineSettings = SineSettings()) -> dict[str, float]:
    """Train the meta-learned and joint initialisations with equal budgets (iterations and
    examples per iteration) and return each initialisation's adapted held-out MSE."""
    torch.manual_seed(s.seed)
    model = build_model("mlp", in_features=1, hidden=(40, 40), out_features=1)
    theta0 = init_params(model)
    rng = np.random.default_rng(s.seed)

    start = time.perf_counter()
    meta, meta_opt = _adam(theta0, s.outer_lr)
    joint, joint_opt = _adam(theta0, s.outer_lr)
    for _ in range(s.meta_iters):
        tasks, _, _ = sample_sine_tasks(s.meta_batch, k_shot=s.k_shot, n_query=s.n_query, rng=rng)
        grads, _ = maml_step(model, {k: v.detach() for k, v in meta.items()}, tasks, s.train_inner, loss="mse")
        for k, v in meta.items():
            v.grad = grads[k]
        meta_opt.step()
        x = torch.cat([tasks.xs, tasks.xq], dim=1).reshape(-1, 1)
        y = torch.cat([tasks.ys, tasks.yq], dim=1).reshape(-1)
        joint_opt.zero_grad()
        task_loss(forward(model, joint, x), y, "mse").backward()
        joint_opt.step()
    train_s = time.perf_counter() - start

    result = {
        name: evaluate(model, {k: v.detach() for k, v in params.items()}, s, seed=s.seed + 1000)
        for name, params in (("meta-learned", meta), ("random", theta0), ("joint", joint))
    }
    result["train_s"] = train_s
    log.info("sine comparison: %s", result)
    return result


def run(*, quick: bool, out_dir: Path) -> list[dict[str, object]]:
    """Rows ``{workload: "sine", init, adapted_mse, ...}``; prints a table."""
    s = SineSettings(meta_iters=1500 if quick else 6000)
    result = compare(s)
    rows: list[dict[str, object]] = [
        {
            "workload": "sine-10shot",
            "init": name,
            "adapted_mse": round(result[name], 4),
            "meta_iters": s.meta_iters,
            "eval_steps": s.eval_inner.steps,
            "eval_lr": s.eval_inner.lr,
        }
        for name in ("meta-learned", "random", "joint")
    ]
    print(f"\nSine regression, 10-shot, {s.eval_inner.steps} SGD steps at lr {s.eval_inner.lr}, "
          f"{s.eval_tasks} held-out tasks ({s.meta_iters} meta-iterations, {result['train_s']:.1f} s):")
    for r in rows:
        print(f"  {r['init']:<13} query MSE {r['adapted_mse']:.4f}")
    return rows
