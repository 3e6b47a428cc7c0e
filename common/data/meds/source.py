"""MEDS sites as fedmeta data: the ``kind: meds`` site file and the data sources ``meds`` and
``synth-meds``.

- ``kind: meds`` is accepted wherever a site file is (:func:`~fedmeta.common.data.site_config.register_kind`),
  parsed by :func:`~fedmeta.common.data.meds.config.parse_meds_site`.
- ``meds``: ``data.path`` is a folder with one sub-folder per site, each holding a ``kind: meds``
  ``site.yaml`` (what ``fedmeta data synth-meds`` writes). In a deployment the coordinator reads
  no site's files: ``data.path`` stays empty and ``data.outcomes`` names the outcomes every site
  labels.
- ``synth-meds``: the synthetic consortium written as MEDS, generated on first use into the cache
  (``<cache>/synth-meds-v<version>-<sites>sites-seed<seed>``), like ``synth-ehr``.

A MEDS site has no feature layout of its own: it is tabularised to the consortium's
:class:`~fedmeta.common.data.meds.vocabulary.Vocabulary`, agreed at the start of a run from the
sites' thresholded code counts (:func:`shared_counts` on each site, then
:func:`~fedmeta.common.data.meds.vocabulary.choose_vocabulary` on the coordinator) and carried in
the experiment (``data.meds.vocabulary`` and its ``fingerprint``, :func:`with_vocabulary`).
Until then the source's :class:`~fedmeta.common.data.registry.DataSpec` says
``needs_agreement``. The transport is the federated layer's; nothing here imports Flower.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedmeta.common.config import DataConfig, ExperimentConfig, config_from_dict
from fedmeta.common.data.base import TabularSite
from fedmeta.common.data.cache import cache_root, ensure_generated
from fedmeta.common.data.meds.config import MedsSiteConfig, parse_meds_site
from fedmeta.common.data.meds.site import load_meds_site
from fedmeta.common.data.meds.validate import validate_meds_dataset
from fedmeta.common.data.meds.vocabulary import (
    Aggregations,
    Vocabulary,
    choose_vocabulary,
    count_codes,
    threshold,
)
from fedmeta.common.data.meds.writer import GENERATOR_VERSION
from fedmeta.common.data.registry import DataSpec, Source, register_source
from fedmeta.common.data.site_config import find_site_configs, register_kind
from fedmeta.common.errors import ConfigError

log = logging.getLogger(__name__)

MEDS_SOURCES = ("meds", "synth-meds")

register_kind("meds", MedsSiteConfig, "'meds' (a MEDS dataset and its label files)",
              parse=parse_meds_site)


# -- the consortium's sites ------------------------------------------------------------------------
def meds_root(cfg: DataConfig) -> Path:
    """The folder of site folders of ``data.source: meds``."""
    if not cfg.path:
        raise ConfigError(
            "data.path is empty: data.source 'meds' needs the folder holding one sub-folder per "
            "site, each with a kind: meds site.yaml (e.g. written by fedmeta data synth-meds); a "
            "deployment's coordinator reads no site's files: it names data.outcomes instead"
        )
    return Path(cfg.path).expanduser()


def synth_meds_root(cfg: DataConfig) -> Path:
    """The synthetic MEDS consortium's folder, generated on first use: ``data.path`` if set, else
    ``<cache>/synth-meds-v<version>-<sites>sites-seed<seed>``. Its flat twin is ``<folder>/flat``."""
    target = (
        Path(cfg.path).expanduser()
        if cfg.path
        else cache_root()
        / f"synth-meds-v{GENERATOR_VERSION}-{cfg.synth_sites}sites-seed{cfg.synth_seed}"
    )

    def generate(folder: Path) -> None:
        from fedmeta.common.data.meds.synth import write_synth_meds

        write_synth_meds(folder, sites=cfg.synth_sites, seed=cfg.synth_seed)

    return ensure_generated(
        target, generate,
        expect={"version": GENERATOR_VERSION, "n_sites": cfg.synth_sites, "seed": cfg.synth_seed},
    )


def _configs_in(root: Path, source: str) -> list[MedsSiteConfig]:
    configs = find_site_configs(root)
    wrong = [c for c in configs if not isinstance(c, MedsSiteConfig)]
    if wrong:
        raise ConfigError(
            f"{wrong[0].source}: kind = {wrong[0].kind!r}, but data.source {source!r} needs every "
            "site to be kind: meds"
        )
    return [c for c in configs if isinstance(c, MedsSiteConfig)]


def meds_site_configs(cfg: DataConfig) -> list[MedsSiteConfig]:
    """Every site file of a ``meds`` or ``synth-meds`` source, in folder order."""
    if cfg.source == "synth-meds":
        return _configs_in(synth_meds_root(cfg), cfg.source)
    if cfg.source == "meds":
        return _configs_in(meds_root(cfg), cfg.source)
    raise ConfigError(f"data.source = {cfg.source!r} is not a MEDS source ({', '.join(MEDS_SOURCES)})")


def consortium_outcomes(cfg: DataConfig, configs: Sequence[MedsSiteConfig]) -> tuple[str, ...]:
    """The outcomes the consortium trains on, in column order: ``data.outcomes`` when set (each
    site must label them all), else the first site's, which every other site must label too."""
    wanted = tuple(cfg.outcomes) or (configs[0].outcomes if configs else ())
    for c in configs:
        missing = [o for o in wanted if o not in c.labels]
        if missing:
            origin = "data.outcomes" if cfg.outcomes else f"the outcomes of {configs[0].source}"
            raise ConfigError(
                f"{c.source}: no label file for outcome(s) {missing}; {origin} are {list(wanted)}"
            )
        if not cfg.outcomes and set(c.outcomes) != set(wanted):
            raise ConfigError(
                f"{c.source}: outcomes {list(c.outcomes)} differ from {list(wanted)} "
                f"({configs[0].source}); name the shared ones in data.outcomes"
            )
    return wanted


def in_outcome_order(site: MedsSiteConfig, outcomes: Sequence[str]) -> MedsSiteConfig:
    """The site file with its label files in the consortium's outcome order (its other label
    files left out), so that outcome column j means the same outcome at every site. A site
    lacking one of them keeps only those it has: the greeting then names what it misses."""
    if not outcomes or tuple(outcomes) == site.outcomes:
        return site
    labels = {o: site.labels[o] for o in outcomes if o in site.labels}
    if not labels:
        return site
    return site.model_copy(update={"labels": labels})


# -- the agreed vocabulary in the experiment ---------------------------------------------------------
def vocabulary_of(cfg: DataConfig) -> Vocabulary | None:
    """The vocabulary the experiment carries (``data.meds.vocabulary``; its fingerprint was checked
    when the experiment was read), or ``None`` before the agreement."""
    if cfg.meds.vocabulary is None:
        return None
    return Vocabulary.model_validate(cfg.meds.vocabulary)


def require_vocabulary(cfg: DataConfig) -> Vocabulary:
    vocab = vocabulary_of(cfg)
    if vocab is None:
        raise ConfigError(
            "data.meds.vocabulary is empty: a MEDS site is tabularised to the consortium's "
            "vocabulary, which the sites agree on at the start of a run"
        )
    return vocab


def with_vocabulary(cfg: ExperimentConfig, vocabulary: Vocabulary) -> ExperimentConfig:
    """``cfg`` carrying ``vocabulary`` and its fingerprint in ``data.meds``."""
    values = cfg.to_dict()
    values["data"]["meds"]["vocabulary"] = json.loads(vocabulary.to_json())
    values["data"]["meds"]["fingerprint"] = vocabulary.fingerprint()
    return config_from_dict(values, where="<agreed vocabulary>")


def agreement_settings(cfg: DataConfig) -> tuple[tuple[str, ...], Aggregations]:
    """The windows and aggregations every site tabularises with (the experiment's)."""
    aggs = cfg.meds.aggregations
    return cfg.meds.windows, Aggregations(numeric=aggs.numeric, other=aggs.other)


# -- the site's side of the agreement ---------------------------------------------------------------
@dataclass(frozen=True)
class SharedCounts:
    """What a site sends for the agreement, and nothing more: patients per code (``codes``) and
    patients with a numeric value per code (``numeric``), each only for codes seen in at least
    ``min_subjects`` of the site's labelled patients."""

    name: str
    min_subjects: int
    codes: dict[str, int]
    numeric: dict[str, int]


def agreement_floor(site: MedsSiteConfig, policy_floor: int = 1) -> int:
    """k: the site file's ``min_subjects``, raised to the site policy's patient floor."""
    return max(site.min_subjects, int(policy_floor))


def shared_counts(site: MedsSiteConfig, *, policy_floor: int = 1, validate: bool = True) -> SharedCounts:
    """Validate the site's dataset (unless ``validate`` is false: done already), count its codes
    once and keep only those seen in at least k = :func:`agreement_floor` patients."""
    if validate:
        validate_meds_dataset(site)
    k = agreement_floor(site, policy_floor)
    counts = count_codes(site)
    shared = SharedCounts(site.name, k, threshold(counts.subjects, min_subjects=k),
                          threshold(counts.numeric, min_subjects=k))
    log.info("meds site %s: sharing counts of %d of %d codes (k = %d), %d with numeric values",
             site.name, len(shared.codes), len(counts.subjects), k, len(shared.numeric))
    return shared


def own_vocabulary(site: MedsSiteConfig, *, top_n: int = 256,
                   shared: SharedCounts | None = None) -> Vocabulary:
    """The vocabulary of this site's own shareable codes, with its site file's windows and
    aggregations: what it tabularises to when working alone (checking its data)."""
    shared = shared or shared_counts(site)
    return choose_vocabulary([shared.codes], min_sites=1, top_n=top_n,
                             numeric_counts=[shared.numeric], windows=site.windows,
                             aggregations=site.aggregations)


# -- the sources ------------------------------------------------------------------------------------
def _spec(cfg: DataConfig, configs: Sequence[MedsSiteConfig] | None) -> DataSpec:
    outcomes = consortium_outcomes(cfg, configs) if configs is not None else tuple(cfg.outcomes)
    sites = tuple(c.name for c in configs) if configs is not None else ()
    vocab = vocabulary_of(cfg)
    if vocab is None:
        return DataSpec("tabular", (0,), 2, sites, outcomes, needs_agreement=True)
    names = vocab.feature_names()
    return DataSpec("tabular", (len(names),), 2, sites, outcomes, features=names)


def meds_spec(cfg: DataConfig) -> DataSpec:
    """The consortium's sites and outcomes from the site files alone (no event is read), or, in a
    deployment (``data.source: meds``, no ``data.path``, ``data.outcomes`` set), from the
    experiment alone; the width is the vocabulary's once agreed."""
    if cfg.source == "meds" and not cfg.path and cfg.outcomes:
        return _spec(cfg, None)
    return _spec(cfg, meds_site_configs(cfg))


def site_config_named(cfg: DataConfig, name: str) -> MedsSiteConfig:
    """The site file of site ``name`` of a MEDS source, in the consortium's outcome order."""
    configs = meds_site_configs(cfg)
    by_name = {c.name: c for c in configs}
    if name not in by_name:
        raise ConfigError(f"site {name!r} is not in source {cfg.source!r}: {', '.join(by_name)}")
    return in_outcome_order(by_name[name], consortium_outcomes(cfg, configs))


def load_meds(cfg: DataConfig, name: str) -> TabularSite:
    """Site ``name`` tabularised to the experiment's vocabulary, split and scaled."""
    return load_meds_site(site_config_named(cfg, name), require_vocabulary(cfg),
                          test_fraction=cfg.test_fraction, seed=cfg.split_seed)


register_source("meds", Source(meds_spec, load_meds))
register_source("synth-meds", Source(meds_spec, load_meds))
