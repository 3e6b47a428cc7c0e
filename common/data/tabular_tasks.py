"""Tabular few-shot tasks: K support and Q query patients drawn from one site and one outcome.

A task is a (site, outcome) pair. Support and query are disjoint draws without replacement from
the patients whose label for that outcome is known; the support set is stratified (both classes
present whenever the site has at least one patient of each) so that a 5-shot task is never
single-class by chance.
"""

from __future__ import annotations

import numpy as np
import torch

from fedmeta.common.data.base import TabularSite
from fedmeta.common.errors import DataError
from fedmeta.common.meta.types import TaskBatch


def _stratified_pick(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``k`` rows with each class represented proportionally (at least one each)."""
    classes = np.unique(labels)
    if len(classes) < 2 or k < 2:
        return rng.choice(len(labels), size=k, replace=False)
    counts = np.array([(labels == c).sum() for c in classes])
    want = np.maximum(1, np.round(k * counts / counts.sum()).astype(int))
    while want.sum() > k:
        want[np.argmax(want)] -= 1
    while want.sum() < k:
        want[np.argmax(counts - want)] += 1
    want = np.minimum(want, counts)
    picks = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False) for c, n in zip(classes, want, strict=True)]
    chosen = np.concatenate(picks)
    if len(chosen) < k:  # a class ran short: fill from the rest
        rest = np.setdiff1d(np.arange(len(labels)), chosen)
        chosen = np.concatenate([chosen, rng.choice(rest, size=k - len(chosen), replace=False)])
    return rng.permutation(chosen)


def sample_tabular_tasks(
    site: TabularSite,
    *,
    n_tasks: int,
    support: int,
    query: int,
    rng: np.random.Generator,
    outcomes: tuple[int, ...] | None = None,
) -> TaskBatch:
    """Draw ``n_tasks`` tasks from the site's training split.

    Each task picks an outcome (uniformly from ``outcomes``, default all), then ``support`` and
    ``query`` disjoint patients with a known label for it. Returns float32 inputs and int64 labels.
    """
    choices = tuple(range(len(site.outcomes))) if outcomes is None else outcomes
    xs, ys, xq, yq = [], [], [], []
    for _ in range(n_tasks):
        o = int(rng.choice(choices))
        known = np.flatnonzero(site.y_train[:, o] >= 0)
        if len(known) < support + query:
            raise DataError(
                f"site {site.name}: outcome {site.outcomes[o]!r} has {len(known)} labelled training "
                f"patients, fewer than support + query = {support} + {query}; lower tasks.support "
                "or tasks.query"
            )
        labels = site.y_train[known, o]
        s_idx = _stratified_pick(labels, support, rng)
        remaining = np.setdiff1d(np.arange(len(known)), s_idx)
        q_idx = rng.choice(remaining, size=query, replace=False)
        xs.append(site.x_train[known[s_idx]])
        ys.append(labels[s_idx])
        xq.append(site.x_train[known[q_idx]])
        yq.append(labels[q_idx])
    return TaskBatch(
        xs=torch.from_numpy(np.stack(xs)),
        ys=torch.from_numpy(np.stack(ys)),
        xq=torch.from_numpy(np.stack(xq)),
        yq=torch.from_numpy(np.stack(yq)),
    )
