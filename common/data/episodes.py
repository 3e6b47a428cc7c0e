"""N-way K-shot episodes (Vinyals et al. 2016; Snell et al. 2017) from a labelled example array.

An episode draws ``n_way`` distinct classes from an allowed class subset, relabels them ``0..N−1``
in random order, and draws ``k_shot`` support and ``n_query`` query examples per class, disjoint.
Meta-training and evaluation use disjoint class subsets (:func:`split_classes`), so evaluation
measures learning of *novel* classes. Support and query are class-major: example ``i`` of the
support has label ``i // k_shot``.

Example::

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> images, labels = rng.normal(size=(200, 1, 8, 8)), np.repeat(np.arange(10), 20)
    >>> train, novel = split_classes(10, n_novel=4, seed=0)
    >>> sampler = EpisodeSampler(images, labels, classes=train, n_way=5, k_shot=1, n_query=3)
    >>> batch = sampler.sample(8, rng=rng)
    >>> tuple(batch.xs.shape), tuple(batch.yq.shape)
    ((8, 5, 1, 8, 8), (8, 15))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedmeta.common.errors import DataError
from fedmeta.common.meta.types import TaskBatch


def _as_numpy(a: np.ndarray | torch.Tensor) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def split_classes(n_classes: int, *, n_novel: int, seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Choose ``n_novel`` of ``n_classes`` class indices as novel classes, the rest for
    meta-training: ``(meta-train classes, novel classes)``, both sorted, disjoint, seeded (every
    site of an experiment gets the same split)."""
    if not 0 < n_novel < n_classes:
        raise DataError(
            f"novel classes = {n_novel}: n_novel must be between 1 and {n_classes - 1} "
            f"for {n_classes} classes"
        )
    perm = np.random.default_rng(seed).permutation(n_classes)
    novel = tuple(sorted(int(c) for c in perm[:n_novel]))
    base = tuple(sorted(int(c) for c in perm[n_novel:]))
    return base, novel


class EpisodeSampler:
    """Samples :class:`TaskBatch` episodes from ``x`` (n, ...) and integer ``labels`` (n,).

    ``classes``: the class subset episodes may use (default all). Every allowed class must have at
    least ``k_shot + n_query`` examples. Inputs become float32 tensors (float64 stays float64).
    """

    def __init__(
        self,
        x: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        *,
        classes: Sequence[int] | None = None,
        n_way: int,
        k_shot: int,
        n_query: int,
    ) -> None:
        labels_np = _as_numpy(labels)
        if labels_np.ndim != 1 or len(labels_np) != len(x):
            raise ValueError(
                f"labels must be 1-D with one entry per example: {len(x)} examples, labels shape {labels_np.shape}"
            )
        if not np.issubdtype(labels_np.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels_np.dtype}")
        for name, value, low in (("n_way", n_way, 2), ("k_shot", k_shot, 1), ("n_query", n_query, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        allowed = tuple(int(c) for c in (np.unique(labels_np) if classes is None else classes))
        if len(set(allowed)) != len(allowed):
            raise ValueError(f"classes has duplicates: {allowed}")
        if len(allowed) < n_way:
            raise ValueError(f"{n_way}-way episodes need at least {n_way} classes, got {len(allowed)}: {allowed}")
        self._index: dict[int, np.ndarray] = {}
        for c in allowed:
            idx = np.flatnonzero(labels_np == c)
            if len(idx) < k_shot + n_query:
                raise ValueError(
                    f"class {c} has {len(idx)} examples, fewer than k_shot + n_query = {k_shot} + {n_query}"
                )
            self._index[c] = idx
        x_t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
        self._x = x_t if x_t.dtype == torch.float64 else x_t.to(torch.float32)
        self.classes = allowed
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query

    def sample(self, n_tasks: int, *, rng: np.random.Generator) -> TaskBatch:
        """``n_tasks`` episodes: ``xs`` (T, N·K, ...), ``ys`` (T, N·K), ``xq`` (T, N·Q, ...), ``yq``."""
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        k, q = self.k_shot, self.n_query
        support, query = [], []
        for _ in range(n_tasks):
            chosen = rng.choice(len(self.classes), size=self.n_way, replace=False)
            s_idx, q_idx = [], []
            for c in chosen:
                picks = rng.choice(self._index[self.classes[c]], size=k + q, replace=False)
                s_idx.append(picks[:k])
                q_idx.append(picks[k:])
            support.append(np.concatenate(s_idx))
            query.append(np.concatenate(q_idx))
        s = torch.from_numpy(np.stack(support))
        qq = torch.from_numpy(np.stack(query))
        ys = torch.arange(self.n_way).repeat_interleave(k).expand(n_tasks, -1).clone()
        yq = torch.arange(self.n_way).repeat_interleave(q).expand(n_tasks, -1).clone()
        return TaskBatch(self._x[s], ys, self._x[qq], yq)
