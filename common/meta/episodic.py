"""Episodic machinery shared by the metric-based learners (ProtoNet, Matching and Relation Networks).

An episode is an N-way classification task: support ``(xs, ys)`` with labels ``0..N−1`` (every
class present) and query ``(xq, yq)``. A metric learner maps an episode to query scores
``(Q, N)`` with no inner optimisation; the meta-objective is the mean over episodes of the mean
query loss, and its gradient is what a site sends. Labels enter the scoring functions as float
one-hot matrices (built once, outside ``vmap``) so the forward pass has no data-dependent indexing.

Support and query are embedded in one forward pass, so a batch-statistics norm
(:class:`fedmeta.common.models.BatchStatNorm2d`) sees both — the usual transductive setting of
episodic training (Snell et al. 2017; Finn et al. 2017).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedmeta.common.meta.engine import choose_impl, compile_applies, compiled, params_device
from fedmeta.common.meta.inner import batched_buffers, buffer_copies
from fedmeta.common.meta.types import MetaStats, Params, TaskBatch

# (model, params, xs, ys_onehot (S, N), xq) -> scores (Q, N)
ScoreFn = Callable[[nn.Module, Params, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (scores (Q, N), yq (Q,), yq_onehot (Q, N)) -> per-query losses (Q,)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_labels(y: torch.Tensor, n_way: int, *, name: str) -> None:
    """``y`` holds int64 class indices in ``0..n_way−1``."""
    if isinstance(n_way, bool) or not isinstance(n_way, int) or n_way < 2:
        raise ValueError(f"n_way must be an integer >= 2, got {n_way!r}")
    if y.dtype != torch.int64:
        raise ValueError(f"episode labels {name} must be int64 class indices, got {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_way):
        raise ValueError(
            f"episode labels {name} must lie in 0..{n_way - 1} for n_way={n_way}, "
            f"got range {int(y.min())}..{int(y.max())}"
        )


def check_support(ys: torch.Tensor, n_way: int) -> None:
    """Support labels ``(T, S)`` are valid and every class appears in every episode."""
    check_labels(ys, n_way, name="ys")
    counts = F.one_hot(ys, n_way).sum(dim=-2).reshape(-1, n_way)  # (T, N)
    missing = (counts == 0).nonzero()
    if missing.numel():
        t, k = (int(v) for v in missing[0])
        raise ValueError(f"episode {t} has no support example of class {k} (n_way={n_way})")


def check_episodes(episodes: TaskBatch, n_way: int) -> None:
    """Labels are int64 in ``0..n_way−1`` and every class appears in every episode's support."""
    check_support(episodes.ys, n_way)
    check_labels(episodes.yq, n_way, name="yq")


def onehot(y: torch.Tensor, n_way: int, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(y, n_way).to(dtype)


def with_buffers(params: Params, buffers: Params | None) -> Params:
    """``params`` and, when given, ``buffers`` in one dict for ``functional_call``: a score function
    then runs on copies of the model's buffers, never on the model's own."""
    return params if buffers is None else {**params, **buffers}


def _key(fn: Callable[..., Any]) -> object:
    """A key that is equal for equal ``functools.partial`` objects (a new one is built per call)."""
    if isinstance(fn, functools.partial):
        return (fn.func, fn.args, tuple(sorted(fn.keywords.items())))
    return fn


def submodule_params(params: Params, prefix: str) -> Params:
    """The entries of ``params`` under ``prefix`` (``"encoder"``: ``"encoder.0.weight"`` ->
    ``"0.weight"``); all of them for an empty prefix."""
    if not prefix:
        return params
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in params.items() if k.startswith(prefix + ".")}


# (model, params, support embeddings (S, ...), one-hot labels (S, N)) -> the tensors the classifier keeps
MemoryFn = Callable[[nn.Module, Params, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
# (model, params, query embeddings (Q, ...), memory) -> scores (Q, N)
QueryFn = Callable[[nn.Module, Params, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class MetricHead:
    """A metric learner, cut where a site's classifier is: an embedding ``f`` (the model, or its
    submodule ``encoder``), what the classifier keeps of a labelled support set (``memory``: the
    prototypes, the embedded support set, the class features) and how it scores embedded queries
    against that memory (``scores``, used as logits: ``softmax`` of them is the class probability
    and their argmax the predicted class).

    Training, federated evaluation, a new site's classifier, a bundle's predictions and its ONNX
    graph all go through these same two halves, so each learner's math is written once.
    ``loss`` is the per-query training loss of the episode scores (cross-entropy unless the paper
    says otherwise). ``onnx`` writes ``scores`` as ONNX nodes (see
    :func:`fedmeta.cli.onnx_export.build_onnx`); ``calibration`` is how a binary site rescales
    ``s = score₁ − score₀`` on leave-one-out scores (``intercept`` when ``s`` is already a
    log-odds, ``platt`` when its scale is arbitrary).
    """

    name: str
    text: str
    #: the names of the tensors ``memory`` returns (what a bundle's ``head/`` holds)
    keeps: tuple[str, ...]
    memory: MemoryFn
    scores: QueryFn
    loss: LossFn
    encoder: str = ""
    flatten: bool = True
    calibration: str = "intercept"
    onnx: Callable[..., str] | None = None

    def embed(self, model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
        """``f(x)``: the embedding network's output, flattened to ``(n, D)`` when ``flatten``."""
        net = model.get_submodule(self.encoder) if self.encoder else model
        z = functional_call(net, submodule_params(params, self.encoder), (x,))
        return z.flatten(start_dim=1) if self.flatten else z

    def episode_scores(self, model: nn.Module, params: Params, xs: torch.Tensor, ys_onehot: torch.Tensor,
                       xq: torch.Tensor) -> torch.Tensor:
        """The :data:`ScoreFn` of one episode: support and query embedded in one forward pass."""
        z = self.embed(model, params, torch.cat([xs, xq], dim=0))
        zs, zq = z[: xs.shape[0]], z[xs.shape[0]:]
        return self.scores(model, params, zq, self.memory(model, params, zs, ys_onehot))

    def logits(self, model: nn.Module, params: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor,
               *, n_way: int) -> torch.Tensor:
        """Query scores ``(Q, N)`` of one episode: support ``xs`` (S, ...), labels ``ys`` (S,) in
        ``0..n_way−1`` (each class present), queries ``xq`` (Q, ...)."""
        check_support(ys[None], n_way)
        dtype = next(iter(params.values())).dtype
        state = with_buffers(params, buffer_copies(model, xs.device))
        return self.episode_scores(model, state, xs, onehot(ys, n_way, dtype), xq)

    def step(self, model: nn.Module, params: Params, episodes: TaskBatch, *, n_way: int, impl: str = "auto",
             compile: bool = False, before_stats: bool = True) -> tuple[Params, MetaStats]:
        """Gradient of the mean query loss over ``episodes`` (:func:`metric_step`)."""
        return metric_step(self.episode_scores, self.loss, model, params, episodes, n_way=n_way, impl=impl,
                           compile=compile, before_stats=before_stats)

    def accuracy(self, model: nn.Module, params: Params, episodes: TaskBatch, *, n_way: int,
                 impl: str = "auto") -> tuple[int, int]:
        """``(n_correct, n_query)`` of classifying every query by its highest score."""
        pred = predict_episodes(self.episode_scores, model, params, episodes, n_way=n_way, impl=impl)
        return count_correct(pred, episodes)


def cross_entropy(scores: torch.Tensor, yq: torch.Tensor, yq_onehot: torch.Tensor) -> torch.Tensor:
    """Per-query cross-entropy of scores used as logits."""
    return F.cross_entropy(scores, yq, reduction="none")


def metric_step(
    score: ScoreFn,
    per_query_loss: LossFn,
    model: nn.Module,
    params: Params,
    episodes: TaskBatch,
    *,
    n_way: int,
    impl: str = "auto",
    compile: bool = False,
    before_stats: bool = True,
) -> tuple[Params, MetaStats]:
    """Gradient of ``(1/T) Σ_t (1/Q) Σ_q ℓ(score_t)_q`` with respect to ``params``, and stats
    (``query_loss_before == query_loss_after``: a metric learner does not adapt; with
    ``before_stats=False`` it is NaN). ``compile=True`` ``torch.compile``s the gradient of the
    vmapped episodes (ignored, with a log line, on the per-task loop or for a model with buffers).
    Neither ``params`` nor ``model`` is modified."""
    device = params_device(params)
    episodes = episodes.to(device)
    check_episodes(episodes, n_way)
    which = choose_impl(model, device, impl, second_order=False)
    buffers = buffer_copies(model, device)
    dtype = next(iter(params.values())).dtype
    ys1, yq1 = onehot(episodes.ys, n_way, dtype), onehot(episodes.yq, n_way, dtype)
    n_tasks, n_query = episodes.n_tasks, episodes.n_query
    scale = 1.0 / (n_tasks * n_query)
    theta = {k: v.detach().requires_grad_() for k, v in params.items()}
    totals = {k: torch.zeros_like(v) for k, v in theta.items()}

    def one_episode(
        p: Params,
        b: Params | None,
        xs: torch.Tensor,
        s1: torch.Tensor,
        xq: torch.Tensor,
        yq: torch.Tensor,
        q1: torch.Tensor,
    ) -> torch.Tensor:
        return per_query_loss(score(model, with_buffers(p, b), xs, s1, xq), yq, q1).sum()

    compile = compile and compile_applies(model, which, buffers)
    inputs = list(theta.values())
    total_loss = 0.0
    if compile:

        def build() -> Callable[..., Any]:
            def objective(p: Params, *data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                losses = torch.func.vmap(
                    one_episode, in_dims=(None, None, 0, 0, 0, 0, 0), randomness="different"
                )(p, None, *data)
                return losses.sum(), losses.sum().detach()

            return torch.func.grad(objective, has_aux=True)

        key = ("the metric-learning gradient", _key(score), _key(per_query_loss))
        grads, value = compiled(model, key, build)(
            {k: v.detach() for k, v in theta.items()}, episodes.xs, ys1, episodes.xq, episodes.yq, yq1
        )
        for k in totals:
            totals[k] += grads[k] * scale
        total_loss = float(value)
    else:
        with torch.enable_grad():
            if which == "vmap":
                losses = torch.func.vmap(
                    one_episode,
                    in_dims=(None, 0 if buffers is not None else None, 0, 0, 0, 0, 0),
                    randomness="different",
                )(theta, batched_buffers(buffers, n_tasks), episodes.xs, ys1, episodes.xq, episodes.yq, yq1)
                objectives: Iterable[torch.Tensor] = [losses.sum()]
            else:
                objectives = (
                    one_episode(theta, buffers, episodes.xs[t], ys1[t], episodes.xq[t], episodes.yq[t], yq1[t])
                    for t in range(n_tasks)
                )
            # The loop generator builds one episode's graph at a time and frees it after its grad.
            for value in objectives:
                grads = torch.autograd.grad(
                    value * scale, inputs, allow_unused=True, materialize_grads=True
                )
                for k, g in zip(theta, grads, strict=True):
                    totals[k] += g
                total_loss += float(value.detach())
                del value  # free this episode's graph before the next one is built
    stats = MetaStats(
        n_tasks=n_tasks,
        n_examples=episodes.n_examples,
        n_query=n_tasks * n_query,
        query_loss_before=total_loss if before_stats else float("nan"),
        query_loss_after=total_loss,
    )
    return totals, stats


@torch.no_grad()
def predict_episodes(
    score: ScoreFn,
    model: nn.Module,
    params: Params,
    episodes: TaskBatch,
    *,
    n_way: int,
    impl: str = "auto",
) -> torch.Tensor:
    """Predicted class ``argmax_k score_{q,k}`` of every query example, shape ``(T, Q)``."""
    device = params_device(params)
    episodes = episodes.to(device)
    check_episodes(episodes, n_way)
    dtype = next(iter(params.values())).dtype
    ys1 = onehot(episodes.ys, n_way, dtype)
    theta = {k: v.detach() for k, v in params.items()}
    buffers = buffer_copies(model, device)
    if choose_impl(model, device, impl, second_order=False) == "vmap":
        scores = torch.func.vmap(
            lambda b, xs, s1, xq: score(model, with_buffers(theta, b), xs, s1, xq),
            in_dims=(0 if buffers is not None else None, 0, 0, 0),
            randomness="different",
        )(batched_buffers(buffers, episodes.n_tasks), episodes.xs, ys1, episodes.xq)
    else:
        scores = torch.stack(
            [
                score(model, with_buffers(theta, buffers), episodes.xs[t], ys1[t], episodes.xq[t])
                for t in range(episodes.n_tasks)
            ]
        )
    return scores.argmax(dim=-1)


def count_correct(predictions: torch.Tensor, episodes: TaskBatch) -> tuple[int, int]:
    """``(n_correct, n_query_examples)``: sums, to be added across batches and sites before dividing."""
    yq = episodes.yq.to(predictions.device)
    return int((predictions == yq).sum()), int(yq.numel())
