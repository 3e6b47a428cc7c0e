"""Types shared by every meta-learning algorithm: parameter dicts, task batches, settings and stats.

An algorithm is a pure function ``(model, params, tasks, settings) -> (update, stats)``. ``params``
is a ``dict[str, Tensor]`` keyed like ``model.named_parameters()``; the ``model`` only supplies the
forward computation (through ``torch.func.functional_call``) and its own parameters are never read
or changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TaskBatch:
    """A meta-batch of ``T`` tasks of equal shape, stacked along dimension 0.

    ``xs``: support inputs ``(T, S, *features)``; ``ys``: support targets ``(T, S)`` (class
    indices, int64, or float regression targets); ``xq``/``yq`` the same for the query set ``(T, Q)``.
    """

    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor

    def __post_init__(self) -> None:
        t = self.xs.shape[0]
        for name in ("ys", "xq", "yq"):
            if getattr(self, name).shape[0] != t:
                raise ValueError(
                    f"TaskBatch.{name} has {getattr(self, name).shape[0]} tasks, xs has {t}"
                )
        if self.xs.shape[:2] != self.ys.shape[:2] or self.xq.shape[:2] != self.yq.shape[:2]:
            raise ValueError(
                f"TaskBatch inputs and targets disagree: xs {tuple(self.xs.shape)}, "
                f"ys {tuple(self.ys.shape)}, xq {tuple(self.xq.shape)}, yq {tuple(self.yq.shape)}"
            )

    @property
    def n_tasks(self) -> int:
        return int(self.xs.shape[0])

    @property
    def n_support(self) -> int:
        return int(self.xs.shape[1])

    @property
    def n_query(self) -> int:
        return int(self.xq.shape[1])

    @property
    def n_examples(self) -> int:
        """Examples used by the batch: every support and query example of every task."""
        return self.n_tasks * (self.n_support + self.n_query)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskBatch:
        """Move every tensor to ``device``; floating inputs (not integer labels) to ``dtype``."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return TaskBatch(move(self.xs), move(self.ys), move(self.xq), move(self.yq))


@dataclass(frozen=True)
class InnerConfig:
    """Inner-loop (task adaptation) settings.

    ``steps`` gradient steps of size ``lr`` on the support loss plus ``proximal / 2 * ||φ - θ||²``,
    which pulls the adapted weights ``φ`` toward the meta-initialisation ``θ`` (iMAML-style
    regulariser, Rajeswaran et al. 2019). ``first_order`` drops second derivatives (FOMAML).
    """

    steps: int = 5
    lr: float = 0.05
    proximal: float = 0.0
    first_order: bool = False

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"inner steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"inner lr must be > 0, got {self.lr}")
        if self.proximal < 0:
            raise ValueError(f"inner proximal must be >= 0, got {self.proximal}")


@dataclass(frozen=True)
class MetaStats:
    """Sums and counts from one meta-batch, addable across batches and sites.

    Losses are sums over query examples, so ``query_loss_after / n_query`` is the mean.
    """

    n_tasks: int
    n_examples: int
    n_query: int
    query_loss_before: float
    query_loss_after: float

    def __add__(self, other: MetaStats) -> MetaStats:
        return MetaStats(
            self.n_tasks + other.n_tasks,
            self.n_examples + other.n_examples,
            self.n_query + other.n_query,
            self.query_loss_before + other.query_loss_before,
            self.query_loss_after + other.query_loss_after,
        )
