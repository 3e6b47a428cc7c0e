"""Data sources by name: what a source's sites look like, and loading one site's own rows.

The coordinator needs only :func:`data_spec` (input shape, classes, site names), which reads no
patient rows. A hospital's client calls :func:`load_site` for its own site and nothing else.

A source is registered with :func:`register_source`; fedmeta ships ``fed-heart`` here and the
EHR/imaging sources in their own modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fedmeta.common.config import DataConfig
from fedmeta.common.data import heart
from fedmeta.common.data.base import Site
from fedmeta.common.errors import ConfigError


@dataclass(frozen=True)
class DataSpec:
    """The shape of a source's data, known without reading any rows.

    ``input_shape``: ``(d,)`` for tables, ``(C, H, W)`` for images. ``n_classes``: classes per task
    (2 for binary outcomes). ``sites``: every site the source holds, in a fixed order.
    """

    kind: Literal["tabular", "images"]
    input_shape: tuple[int, ...]
    n_classes: int
    sites: tuple[str, ...]
    outcomes: tuple[str, ...] = ()
    #: Encoded feature names in model-input order (tables), when the source knows them: what
    #: every site's own data must encode to, checked at the handshake.
    features: tuple[str, ...] = ()
    #: The features are not known yet: the sites agree on them at the start of a run (MEDS
    #: sources without ``data.meds.vocabulary``); ``input_shape`` is ``(0,)`` until then.
    needs_agreement: bool = False

    def layout(self) -> dict[str, list]:
        """What a site compares its own data with: features, outcomes and the input shape."""
        return {"features": list(self.features), "outcomes": list(self.outcomes),
                "input_shape": list(self.input_shape)}


@dataclass(frozen=True)
class Source:
    spec: Callable[[DataConfig], DataSpec]
    load: Callable[[DataConfig, str], Site]
    #: The extras (:mod:`fedmeta.common.extras`) reading this source needs under ``cfg``.
    needs: Callable[[DataConfig], tuple[str, ...]] = lambda cfg: ()


_SOURCES: dict[str, Source] = {}


def register_source(name: str, source: Source) -> None:
    _SOURCES[name] = source


def _source(cfg: DataConfig) -> Source:
    if cfg.source not in _SOURCES:
        _load_builtin_sources()
    try:
        return _SOURCES[cfg.source]
    except KeyError:
        raise ConfigError(
            f"data.source = {cfg.source!r}: unknown; available: {', '.join(sorted(_SOURCES))}"
        ) from None


def data_spec(cfg: DataConfig) -> DataSpec:
    """Shape and site names of the configured source, with ``data.sites`` checked against it."""
    spec = _source(cfg).spec(cfg)
    for key in ("sites", "holdout"):
        if not spec.sites:  # a deployment's sites are known only when they connect
            break
        unknown = [s for s in getattr(cfg, key) if s not in spec.sites]
        if unknown:
            raise ConfigError(
                f"data.{key}: site {unknown[0]!r} is not in source {cfg.source!r}; "
                f"its sites: {', '.join(spec.sites)}"
            )
    return spec


def training_sites(cfg: DataConfig) -> tuple[str, ...]:
    """Sites that take part in federated training: ``data.sites`` (or all) minus ``data.holdout``."""
    spec = data_spec(cfg)
    chosen = cfg.sites or spec.sites
    return tuple(s for s in chosen if s not in cfg.holdout)


def simulation_sites(cfg: DataConfig) -> tuple[str, ...]:
    """Every site a simulation starts a node for: the training sites, then the held-out ones
    (which join only for the final evaluation, as new hospitals)."""
    return training_sites(cfg) + tuple(cfg.holdout)


def check_installed(cfg: DataConfig) -> None:
    """Raise :class:`fedmeta.common.extras.MissingExtra`, naming the extra to install, when
    reading ``cfg``'s data needs a package that is not installed (before anything starts)."""
    from fedmeta.common import extras

    for extra in _source(cfg).needs(cfg):
        extras.require(extra)


def load_site(cfg: DataConfig, name: str) -> Site:
    """Load one site's own rows (training and test splits)."""
    check_installed(cfg)
    spec = data_spec(cfg)
    if name not in spec.sites:
        raise ConfigError(f"site {name!r} is not in source {cfg.source!r}: {', '.join(spec.sites)}")
    return _source(cfg).load(cfg, name)


def _heart_spec(cfg: DataConfig) -> DataSpec:
    return DataSpec("tabular", (len(heart.FEATURES),), 2, heart.HOSPITALS, (heart.OUTCOME,),
                    features=heart.FEATURES)


def _heart_load(cfg: DataConfig, name: str) -> Site:
    return heart.load_hospital(
        name, path=cfg.path or None, train_fraction=1 - cfg.test_fraction, split_seed=cfg.split_seed
    )


register_source("fed-heart", Source(_heart_spec, _heart_load,
                                    needs=lambda cfg: () if cfg.path else ("demo",)))


def _load_builtin_sources() -> None:
    """Import the modules that register the other built-in sources (EHR folders, images, MEDS)."""
    import importlib

    for module in ("fedmeta.common.data.ehr", "fedmeta.common.data.images",
                   "fedmeta.common.data.meds.source"):
        importlib.import_module(module)
