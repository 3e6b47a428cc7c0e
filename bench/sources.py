"""Validation data sources: hyperparameters are never chosen on a test split.

:func:`register_validation_sources` adds ``<source>-val`` data sources whose "test" split is
carved out of each site's *training* split, so a benchmark can select settings on it before
scoring the real test splits once.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from sklearn.model_selection import train_test_split

from fedmeta.common.config import DataConfig
from fedmeta.common.data.base import Site, TabularSite
from fedmeta.common.data.registry import DataSpec, Source, _source, register_source

VAL_SUFFIX = "-val"
VAL_FRACTION = 0.3
VAL_SEED = 11


def _carve_validation(site: Site) -> Site:
    """The site's training split cut into train (70 %) and validation (30 %, stored as "test"),
    stratified on the first outcome; the real test split is not touched."""
    if not isinstance(site, TabularSite):
        raise TypeError("validation splits are defined for tabular sites only")
    labels = site.y_train[:, 0]
    counts = np.bincount(labels[labels >= 0], minlength=2)
    strat = labels if counts.min() > 2 and (labels >= 0).all() else None
    idx = np.arange(site.n_train)
    tr, va = train_test_split(idx, test_size=VAL_FRACTION, random_state=VAL_SEED, stratify=strat)
    return replace(
        site, x_train=site.x_train[tr], y_train=site.y_train[tr], x_test=site.x_train[va],
        y_test=site.y_train[va], row_ids_train=(), row_ids_test=(),
    )


def register_validation_sources(*names: str) -> None:
    """Register ``NAME-val`` for each data source ``NAME`` (see :func:`_carve_validation`)."""
    for name in names:
        base = _source(DataConfig(source=name))

        def spec(cfg: DataConfig, base: Source = base, name: str = name) -> DataSpec:
            return base.spec(cfg.model_copy(update={"source": name}))

        def load(cfg: DataConfig, site: str, base: Source = base, name: str = name) -> Site:
            return _carve_validation(base.load(cfg.model_copy(update={"source": name}), site))

        register_source(name + VAL_SUFFIX, Source(spec, load))
