"""A hospital's own data, as the site sees it: one ``site.yaml`` and the files it names.

The file format and its parser live in :mod:`fedmeta.common.data.site_config` (the data
registry reads the same files in simulation). This module is the site-side entry point:
:func:`load_local_site` loads and fully validates the site's data against the experiment's task
settings before any training, :func:`check_site` summarises it for ``fedmeta data check``
(rows, outcome prevalence and missingness, computed on the site and never sent anywhere), and
:func:`site_for_node` finds the data a node serves and keeps it loaded between rounds.

A MEDS site (``kind: meds``) is tabularised to the vocabulary the experiment carries
(``data.meds.vocabulary``, agreed at the start of the run); :func:`meds_site_for_node` finds the
MEDS site file a node serves, whose thresholded code counts it shares for that agreement.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmeta.common.config import DataConfig, ExperimentConfig, TaskConfig
from fedmeta.common.data.base import ImageSite, Site, TabularSite
from fedmeta.common.data.ehr import EhrCohort, check_k_shot, load_ehr_site
from fedmeta.common.data.images import check_n_way_k_shot, load_image_site
from fedmeta.common.data.registry import DataSpec, data_spec, load_site, simulation_sites
from fedmeta.common.data.site_config import (
    EhrSiteConfig,
    ImageSiteConfig,
    SiteConfig,
    find_site_configs,
    load_site_config,
    parse_site_config,
)
from fedmeta.common.errors import ConfigError
from fedmeta.sitecore.policy import patient_floor

if TYPE_CHECKING:
    from fedmeta.common.data.meds.config import MedsSiteConfig

__all__ = [
    "EhrSiteConfig",
    "ImageSiteConfig",
    "SiteConfig",
    "SiteSummary",
    "check_site",
    "load_local_site",
    "load_site_config",
    "meds_site_for_node",
    "parse_site_config",
    "site_for_node",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteSummary:
    """What ``fedmeta data check`` reports about a site (aggregates only).

    Tables: ``prevalence``/``labelled`` per outcome, ``missing`` fraction per feature, ``units``
    rows per unit. Images: ``class_counts`` training images per class, ``image_shape``.
    """

    name: str
    kind: str
    source: Path
    data_path: Path
    n_rows: int
    n_train: int
    n_test: int
    n_features: int = 0
    prevalence: dict[str, float] = field(default_factory=dict)
    labelled: dict[str, int] = field(default_factory=dict)
    missing: dict[str, float] = field(default_factory=dict)
    units: dict[str, int] = field(default_factory=dict)
    class_counts: dict[str, int] = field(default_factory=dict)
    image_shape: tuple[int, ...] = ()
    #: MEDS: :func:`fedmeta.common.data.meds.check.check_meds_site`'s summary, and for the
    #: feature agreement the codes this site would share (seen in >= ``min_subjects`` patients).
    meds: dict[str, Any] = field(default_factory=dict)
    shared_codes: int = 0
    min_subjects: int = 0


def _is_meds(config: object) -> bool:
    return getattr(config, "kind", None) == "meds"


def _load_meds(config: MedsSiteConfig, data: DataConfig) -> TabularSite:
    """A MEDS site tabularised to the experiment's agreed vocabulary, its outcome columns in the
    experiment's order (``data.outcomes``) when the experiment names them. Without a vocabulary
    (a site checking its data on its own, e.g. ``fedmeta site start``'s preflight) it is
    tabularised to its own codes; a run always carries the agreed one, and a site whose layout
    differs is excluded at the greeting."""
    from fedmeta.common.data.meds.site import load_meds_site
    from fedmeta.common.data.meds.source import in_outcome_order, own_vocabulary, vocabulary_of

    vocab = vocabulary_of(data) or own_vocabulary(config, top_n=data.meds.top_n)
    return load_meds_site(in_outcome_order(config, data.outcomes), vocab,
                          test_fraction=data.test_fraction, seed=data.split_seed)


def _load(config: SiteConfig, data: DataConfig) -> tuple[Site, EhrCohort | None]:
    if isinstance(config, EhrSiteConfig):
        cohort = load_ehr_site(config, test_fraction=data.test_fraction, seed=data.split_seed)
        return cohort.site, cohort
    if _is_meds(config):
        return _load_meds(config, data), None  # type: ignore[arg-type]
    return load_image_site(config, test_fraction=data.test_fraction, seed=data.split_seed), None


def _check_tasks(config: SiteConfig, site: Site, tasks: TaskConfig) -> None:
    if isinstance(site, TabularSite):
        check_k_shot(site, support=tasks.support, query=tasks.query, source=str(config.source))
    else:
        check_n_way_k_shot(
            site, ways=tasks.ways, shots=tasks.support, query=tasks.query, source=str(config.source)
        )


def load_local_site(
    site_yaml: str | Path,
    *,
    data: DataConfig | None = None,
    tasks: TaskConfig | None = None,
) -> Site:
    """Load this hospital's data from its site file, validated for the experiment's tasks.

    ``data`` supplies the split defaults (``test_fraction``, ``split_seed``) where the site file
    sets none; ``tasks`` (if given) must be drawable: enough labelled patients per outcome, or
    enough images in enough classes. Raises :class:`ConfigError` / :class:`DataError`.
    """
    config = load_site_config(site_yaml)
    site, _ = _load(config, data or DataConfig())
    if tasks is not None:
        _check_tasks(config, site, tasks)
    return site


def check_site(
    site_yaml: str | Path,
    *,
    data: DataConfig | None = None,
    tasks: TaskConfig | None = None,
) -> SiteSummary:
    """Validate a site's data as :func:`load_local_site` does and summarise it.

    A MEDS site is tabularised to ``data.meds.vocabulary`` when given (e.g. a run's
    ``config.json``), else to a vocabulary of its own codes, as it would be when working alone."""
    config = load_site_config(site_yaml)
    if _is_meds(config):
        return _check_meds(config, data or DataConfig(), tasks)
    site, cohort = _load(config, data or DataConfig())
    if tasks is not None:
        _check_tasks(config, site, tasks)
    if isinstance(site, TabularSite):
        assert cohort is not None
        units: dict[str, int] = {}
        if cohort.units_train is not None and cohort.units_test is not None:
            values, counts = np.unique(
                np.concatenate([cohort.units_train, cohort.units_test]).astype(str),
                return_counts=True,
            )
            units = {str(v): int(c) for v, c in zip(values, counts, strict=True)}
        return SiteSummary(
            name=site.name,
            kind="ehr",
            source=config.source,
            data_path=config.path,
            n_rows=cohort.n_rows,
            n_train=site.n_train,
            n_test=site.n_test,
            n_features=site.n_features,
            prevalence=dict(cohort.prevalence),
            labelled=dict(cohort.labelled),
            missing=dict(cohort.missing),
            units=units,
        )
    assert isinstance(site, ImageSite)
    counts = np.bincount(site.y_train, minlength=site.n_classes)
    return SiteSummary(
        name=site.name,
        kind="images",
        source=config.source,
        data_path=config.path,
        n_rows=site.n_train + site.n_test,
        n_train=site.n_train,
        n_test=site.n_test,
        class_counts={c: int(n) for c, n in zip(site.classes, counts, strict=True)},
        image_shape=tuple(int(v) for v in site.x_train.shape[1:]),
    )


def _check_meds(config: MedsSiteConfig, data: DataConfig, tasks: TaskConfig | None) -> SiteSummary:
    from fedmeta.common.data.meds.check import check_meds_site
    from fedmeta.common.data.meds.site import load_meds_site
    from fedmeta.common.data.meds.source import own_vocabulary, shared_counts, vocabulary_of

    summary = check_meds_site(config, test_fraction=data.test_fraction, seed=data.split_seed)
    shared = shared_counts(config, validate=False)  # validated just above
    vocab = vocabulary_of(data) or own_vocabulary(config, top_n=data.meds.top_n, shared=shared)
    site = load_meds_site(config, vocab, test_fraction=data.test_fraction, seed=data.split_seed)
    if tasks is not None:
        _check_tasks(config, site, tasks)  # type: ignore[arg-type]
    return SiteSummary(
        name=site.name, kind="meds", source=config.source, data_path=config.path,
        n_rows=site.n_train + site.n_test, n_train=site.n_train, n_test=site.n_test,
        n_features=site.n_features, meds=summary, shared_codes=len(shared.codes),
        min_subjects=shared.min_subjects,
    )


_LOADED: dict[tuple[str, str], Site] = {}
#: How many loaded copies of one node's site a process keeps (the most recently used): a run
#: uses one or two (training and validation views); each distinct data section costs a copy of
#: the rows. The bound is per node: a deployed site's worker serves one node, while a simulation
#: process serves many, and each keeps its own rows loaded between rounds (with one bound for the
#: whole process, 200 simulated sites on 2 actors reloaded their rows at every message, and with
#: them the source's whole site list: a round grew with the square of the sites).
_MAX_LOADED = 4


def _cache_key(node_config: Mapping[str, object], cfg: ExperimentConfig) -> tuple[str, str]:
    """What a loaded site depends on: ``(the node's config, the experiment's data settings)``,
    the agreed vocabulary by its fingerprint (the first part alone names the node)."""
    data = cfg.to_dict()["data"]
    data["meds"].pop("vocabulary", None)  # the fingerprint stands for it
    return (json.dumps({k: str(v) for k, v in node_config.items()}, sort_keys=True),
            json.dumps(data, sort_keys=True))


def _node_data(node_config: Mapping[str, object], cfg: ExperimentConfig) -> DataConfig:
    """The data source a node config names (``source``, ``path``, ``synth-*``), with the
    experiment's split settings and agreed vocabulary only."""
    return DataConfig(
        source=str(node_config["source"]), path=str(node_config.get("path", "")),
        synth_sites=int(str(node_config.get("synth-sites", 10))),
        synth_seed=int(str(node_config.get("synth-seed", 0))),
        test_fraction=cfg.data.test_fraction, split_seed=cfg.data.split_seed,
        outcomes=cfg.data.outcomes, meds=cfg.data.meds,
    )


def _source_site(node_config: Mapping[str, object], cfg: ExperimentConfig) -> tuple[DataConfig, str] | None:
    """The (data source, site name) a node config names, or ``None`` when it names a site file."""
    if "site-config" in node_config:
        return None
    if "source" in node_config:
        data = _node_data(node_config, cfg)
        if "site" in node_config:
            return data, str(node_config["site"])
        names = data_spec(data).sites
        pid = int(str(node_config.get("partition-id", -1)))
        if not 0 <= pid < len(names):
            raise ConfigError(f"partition-id {pid} out of range: source {data.source} has "
                              f"{len(names)} sites")
        return data, names[pid]
    if "partition-id" in node_config:
        names = simulation_sites(cfg.data)
        pid = int(str(node_config["partition-id"]))
        if not 0 <= pid < len(names):
            raise ConfigError(f"partition-id {pid} out of range: the experiment has {len(names)} sites")
        return cfg.data, names[pid]
    if "site" in node_config:
        return cfg.data, str(node_config["site"])
    raise ConfigError("node config names no site: set site-config=PATH, source and site, "
                      "or partition-id=N")


def meds_site_for_node(node_config: Mapping[str, object], cfg: ExperimentConfig) -> MedsSiteConfig:
    """The MEDS site file of the site a node serves (see :func:`site_for_node` for how a node
    config names it), for the feature agreement; :class:`ConfigError` for any other kind."""
    from fedmeta.common.data.meds.config import MedsSiteConfig
    from fedmeta.common.data.meds.source import MEDS_SOURCES, site_config_named

    named = _source_site(node_config, cfg)
    if named is None:
        config = load_site_config(str(node_config["site-config"]))
        if not isinstance(config, MedsSiteConfig):
            raise ConfigError(f"{config.source}: kind {config.kind!r}: only kind: meds sites take "
                              "part in the feature agreement")
        return config
    data, name = named
    if data.source not in MEDS_SOURCES:
        raise ConfigError(f"data.source {data.source!r}: only MEDS sources ({', '.join(MEDS_SOURCES)}) "
                          "take part in the feature agreement")
    return site_config_named(data, name)


def spec_of(site: Site) -> DataSpec:
    """The shape of this site's own data, what the site builds its model from: its encoded
    features (or image shape) and classes, never the coordinator's data settings (a hospital
    reads nothing the coordinator names). The greeting checks it equals the consortium's."""
    if isinstance(site, TabularSite):
        return DataSpec("tabular", (site.n_features,), 2, (site.name,), site.outcomes,
                        features=site.feature_names)
    return DataSpec("images", tuple(int(v) for v in site.x_train.shape[1:]), site.n_classes, (site.name,))


def site_for_node(node_config: Mapping[str, object], cfg: ExperimentConfig) -> Site:
    """The rows of the site a node serves, loaded once per process and kept between rounds.

    ``node_config`` names the site, and only the site decides it:

    - ``site-config``: the path of the hospital's data description (a real hospital);
    - ``source`` with ``site`` or ``partition-id``: one site of a data source installed with
      fedmeta (``path``, ``synth-sites``, ``synth-seed`` for generated ones);
    - ``partition-id`` alone (simulation, one machine): the i-th site of the experiment's own
      source, training sites first, then held-out ones.

    The experiment contributes only its split settings (``data.test_fraction``,
    ``data.split_seed``), which the site's policy bounds, and for a MEDS site the agreed
    vocabulary (whose fingerprint was checked when the experiment was read) and the outcome
    order; nothing else of the coordinator's data settings, and nothing on the coordinator's file
    system, is read. A MEDS site is kept once per vocabulary fingerprint.
    """
    key = _cache_key(node_config, cfg)
    if key in _LOADED:
        _LOADED[key] = _LOADED.pop(key)  # most recently used last
        return _LOADED[key]
    named = _source_site(node_config, cfg)
    if named is None:
        site = load_local_site(str(node_config["site-config"]), data=cfg.data, tasks=cfg.tasks)
    else:
        site = load_site(*named)
    if cfg.data.meds.vocabulary is not None and isinstance(site, TabularSite):
        from fedmeta.common.data.meds.source import require_vocabulary

        codes = [c for _, c, _ in require_vocabulary(cfg.data).columns()]
        site = without_rare_codes(site, meds_site_for_node(node_config, cfg), column_codes=codes,
                                  floor=patient_floor(node_config))
    if cfg.data.score_on == "validation":
        site = validation_view(site, fraction=cfg.data.validation_fraction, seed=cfg.data.split_seed)
    _LOADED[key] = site
    mine = [k for k in _LOADED if k[0] == key[0]]  # this node's copies, least recently used first
    for old in mine[:-_MAX_LOADED]:  # a coordinator varying the data settings cannot fill memory
        _LOADED.pop(old)
    return site


def without_rare_codes(site: TabularSite, config: Any, *, column_codes: Sequence[str],
                       floor: int) -> TabularSite:
    """The site tabularised to the coordinator's vocabulary, re-checked against its own counts:
    the columns of a vocabulary code that fewer than k of this site's patients have (k: its
    ``min_subjects`` raised to the policy's floor, as in the count reply) are set as if the site
    had no such code (0 after scaling, ``present`` 0). The fingerprint proves only that the
    vocabulary is the one the coordinator sent, not that the site's counts allowed it: a code
    below k would let a crafted θ read its few holders' outcomes. ``column_codes``: the code of
    each column, from the vocabulary's own layout (:meth:`Vocabulary.columns`; a feature name
    does not always say its code: the age column is ``MEDS_BIRTH/age_years``)."""
    from fedmeta.common.data.meds.source import agreement_floor
    from fedmeta.common.data.meds.vocabulary import count_codes

    k = agreement_floor(config, floor)
    counts = count_codes(config).subjects
    if len(column_codes) != site.n_features:
        raise ConfigError(f"the vocabulary has {len(column_codes)} columns, the site {site.n_features}")
    rare = [j for j, code in enumerate(column_codes) if counts.get(code, 0) < k]
    if not rare:
        return site
    x_train, x_test = site.x_train.copy(), site.x_test.copy()
    x_train[:, rare] = 0.0
    x_test[:, rare] = 0.0
    codes = sorted({column_codes[j] for j in rare})
    log.warning("site %s: %d vocabulary code(s) are held by fewer than k = %d of its patients; "
                "their %d column(s) are left empty here", site.name, len(codes), k, len(rare))
    return dataclasses.replace(site, x_train=x_train, x_test=x_test)


def validation_view(site: Site, *, fraction: float, seed: int) -> Site:
    """The site as model selection sees it: its training rows less a validation split as the
    training split, the validation split as the test split. The validation split is ``fraction``
    of the training rows, stratified by the first outcome's label (unlabelled rows count as their
    own stratum), drawn with ``seed``; the test split is never read. Image sites are not split."""
    if not isinstance(site, TabularSite):
        raise ConfigError("data.score_on = validation: model selection is for tables; image sites "
                          "run an explicit algorithm")
    rng = np.random.default_rng([seed, 7919])
    labels = site.y_train[:, 0]
    val = np.zeros(site.n_train, dtype=bool)
    for value in np.unique(labels):
        idx = np.flatnonzero(labels == value)
        k = int(round(fraction * len(idx)))
        if 0 < k < len(idx):
            val[rng.choice(idx, size=k, replace=False)] = True
    ids = np.asarray(site.row_ids_train) if site.row_ids_train else None
    return dataclasses.replace(
        site, x_train=site.x_train[~val], y_train=site.y_train[~val], x_test=site.x_train[val],
        y_test=site.y_train[val],
        row_ids_train=tuple(ids[~val].tolist()) if ids is not None else (),
        row_ids_test=tuple(ids[val].tolist()) if ids is not None else ())


@dataclass(frozen=True)
class AdaptationSite:
    """A new hospital's site with what a bundle needs to score its future patients: the fitted
    ``preprocessing`` (:mod:`fedmeta.common.preprocessing`) and the ``id_column`` of its table."""

    site: Site
    preprocessing: object
    id_column: str | None = None


def load_adaptation_site(cfg: ExperimentConfig, *, site_yaml: str | Path | None = None,
                         site_name: str | None = None) -> AdaptationSite:
    """Load the site a new hospital adapts on — its own site file, or a site of the run's data
    source (e.g. a held-out hospital) — with the preprocessing fitted on its training rows."""
    from fedmeta.common.preprocessing import (
        EhrPreprocessing,
        HeartPreprocessing,
        ImagePreprocessing,
    )

    if site_yaml is not None:
        config = load_site_config(site_yaml)
        site, cohort = _load(config, cfg.data)
        if isinstance(config, EhrSiteConfig):
            assert cohort is not None
            return AdaptationSite(site, EhrPreprocessing.from_site_config(config, cohort), config.id_column)
        if isinstance(site, ImageSite):
            return AdaptationSite(site, ImagePreprocessing.for_site(site))
        raise ConfigError(f"{site_yaml}: kind {config.kind!r} sites cannot be adapted into a bundle yet")
    if site_name is None:
        raise ConfigError("name the site: a site file or a site of the run's data source")
    site = load_site(cfg.data, site_name)
    if isinstance(site, ImageSite):
        return AdaptationSite(site, ImagePreprocessing.for_site(site))
    assert isinstance(site, TabularSite)
    if cfg.data.source == "fed-heart":
        return AdaptationSite(site, HeartPreprocessing.for_site(site, path=cfg.data.path or None), "id")
    if cfg.data.source in ("ehr", "synth-ehr"):
        from fedmeta.common.data.ehr import ehr_root, synth_ehr_root

        root = synth_ehr_root(cfg.data) if cfg.data.source == "synth-ehr" else ehr_root(cfg.data)
        by_name = {c.name: c for c in find_site_configs(root)}
        config = by_name[site_name]
        cohort = load_ehr_site(config, test_fraction=cfg.data.test_fraction, seed=cfg.data.split_seed)
        return AdaptationSite(cohort.site, EhrPreprocessing.from_site_config(config, cohort), config.id_column)
    raise ConfigError(f"data.source {cfg.data.source!r}: a bundle needs the site's own file; use "
                      "--site site.yaml")
