"""Loading a MEDS site into the :class:`~fedmeta.common.data.base.TabularSite` every algorithm uses.

:func:`load_meds_site` validates the dataset (:func:`validate_meds_dataset`), turns its label files
into samples, tabularises them to the consortium's :class:`Vocabulary` (one row per
``(subject, prediction time)``, features in the vocabulary's order, one outcome column per label
file, -1 where a label file has no row for the sample), splits by subject (:mod:`.splits`) and fits
imputation and scaling on the training rows only.

Preprocessing reuses :func:`fedmeta.common.data.schema.fit_preprocessor` and its
:class:`~fedmeta.common.data.schema.Preprocessor`: a missing value (a window holding no value of a
code) is imputed with the training median, then each column is z-scored with training statistics,
except the 0/1 ``present`` columns, kept as they are like the one-hot columns of table sites.
No separate missing indicators are added: each value aggregation sits beside its code's ``count``
(or ``present``) column in the same window, which already says whether the value was observed,
and the vocabulary, not the data, fixes the width.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fedmeta.common.data.base import TabularSite
from fedmeta.common.data.meds.config import MedsSiteConfig
from fedmeta.common.data.meds.labels import Samples, build_samples, read_label_file
from fedmeta.common.data.meds.schema import data_shards
from fedmeta.common.data.meds.splits import read_subject_splits, split_samples
from fedmeta.common.data.meds.tabularise import tabularise_shards
from fedmeta.common.data.meds.validate import validate_meds_dataset
from fedmeta.common.data.meds.vocabulary import Vocabulary
from fedmeta.common.data.schema import Feature, Preprocessor, Schema, fit_preprocessor
from fedmeta.common.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MedsFeatures:
    """A site's tabularised samples before splitting and scaling.

    ``x``: float32 ``(n, d)`` raw aggregates (NaN: no value in the window); ``y``: int64
    ``(n, O)``; ``subject_id`` and ``prediction_time`` (µs since 1970) identify each row.
    """

    subject_id: np.ndarray
    prediction_time: np.ndarray
    x: np.ndarray
    y: np.ndarray
    feature_names: tuple[str, ...]
    outcomes: tuple[str, ...]
    n_events: int


def read_samples(cfg: MedsSiteConfig) -> Samples:
    """The site's samples, from its label files in the site file's order."""
    return build_samples([read_label_file(p, o) for o, p in cfg.labels.items()])


def tabularise_site(
    cfg: MedsSiteConfig, vocabulary: Vocabulary, *, workers: int = 1
) -> MedsFeatures:
    """Tabularise every labelled sample of the site (no validation, no split, no scaling)."""
    samples = read_samples(cfg)
    x, n_events = tabularise_shards(data_shards(cfg.path), samples, vocabulary, workers=workers)
    return MedsFeatures(
        samples.subject_id,
        samples.prediction_time,
        x,
        samples.y,
        vocabulary.feature_names(),
        samples.outcomes,
        n_events,
    )


def fit_scaling(x_train: np.ndarray, names: tuple[str, ...]) -> Preprocessor:
    """Median imputation and z-scoring fitted on training rows, of every column except the 0/1
    ``present`` columns, which pass through unchanged as the one-hot and missing-indicator columns
    of table sites do (z-scoring them would change how strongly an L2 penalty or a learning rate
    treats them, and nothing else).

    A column with no training value (typically a vocabulary code this hospital records under
    another code) gets median 0, mean 0, std 1, as in :func:`fit_preprocessor`; it is reported
    in one warning naming the codes rather than one line per column."""
    scaled = [j for j, n in enumerate(names) if not n.endswith("/present")]
    x = x_train[:, scaled].astype(np.float64)
    empty = np.isnan(x).all(axis=0) if x.shape[0] else np.ones(x.shape[1], dtype=bool)
    if empty.any():
        cols = np.asarray([names[j] for j in scaled])[empty]
        codes = sorted({n.split("/", 1)[-1].rsplit("/", 1)[0] for n in cols})
        log.warning(
            "%d feature column(s) have no training value at this site (codes %s): imputed as 0",
            int(empty.sum()), codes[:10] + (["..."] if len(codes) > 10 else []),
        )
        x[:, empty] = 0.0
    fitted = fit_preprocessor(x, Schema(tuple(Feature(names[j], "numeric") for j in scaled)))
    return Preprocessor(tuple(scaled), fitted.median, fitted.mean, fitted.std)


def load_meds_site(
    cfg: MedsSiteConfig,
    vocabulary: Vocabulary,
    *,
    test_fraction: float = 0.34,
    seed: int = 43,
    workers: int = 1,
) -> TabularSite:
    """Validate, tabularise, split and preprocess the site (module docstring).

    ``test_fraction`` and ``seed`` apply where the site file sets none and the dataset has no
    ``subject_splits.parquet``. Each outcome needs both classes among the site's labelled rows and
    among its training rows (:class:`DataError` otherwise, as for table sites).
    """
    validate_meds_dataset(cfg)
    feats = tabularise_site(cfg, vocabulary, workers=workers)
    tf = cfg.test_fraction if cfg.test_fraction is not None else test_fraction
    sd = cfg.seed if cfg.seed is not None else seed
    samples = Samples(feats.subject_id, feats.prediction_time, feats.y, feats.outcomes)
    train, test = split_samples(samples, read_subject_splits(cfg.path), test_fraction=tf, seed=sd)
    for j, o in enumerate(feats.outcomes):
        for rows, where in ((np.arange(len(samples)), "labelled rows"), (train, "training rows")):
            lab = feats.y[rows, j][feats.y[rows, j] >= 0]
            if np.unique(lab).size < 2:
                raise DataError(
                    f"{cfg.labels[o]}: outcome {o!r} has "
                    f"{'no label' if lab.size == 0 else f'a single class ({int(lab[0])})'} among "
                    f"the site's {lab.size} {where}; a task needs both classes. Hint: drop this "
                    "outcome for this site"
                )
    if train.size == 0 or test.size == 0:
        raise DataError(f"site {cfg.name}: the split left {train.size} training and {test.size} test rows")
    pre = fit_scaling(feats.x[train], feats.feature_names)
    log.info(
        "meds site %s: %d samples (%d train, %d test), %d features, vocabulary %s",
        cfg.name, len(samples), train.size, test.size, vocabulary.width,
        vocabulary.fingerprint()[:12],
    )
    return TabularSite(
        name=cfg.name,
        x_train=pre.transform(feats.x[train]),
        y_train=feats.y[train],
        x_test=pre.transform(feats.x[test]),
        y_test=feats.y[test],
        feature_names=feats.feature_names,
        outcomes=feats.outcomes,
        row_ids_train=tuple(int(s) for s in feats.subject_id[train]),
        row_ids_test=tuple(int(s) for s in feats.subject_id[test]),
    )
