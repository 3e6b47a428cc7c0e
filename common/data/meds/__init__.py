"""MEDS sites: hospitals that export Medical Event Data Standard datasets join as they are.

A MEDS dataset holds Parquet shards of events ``subject_id, time, code, numeric_value`` plus
metadata; prediction tasks come as label files ``subject_id, prediction_time, boolean_value``.
This package turns such a site into the :class:`~fedmeta.common.data.base.TabularSite` that every
fedmeta algorithm uses, without a hand-written flat export:

- :mod:`.config`: the ``kind: meds`` site file (:class:`MedsSiteConfig`, :func:`parse_meds_site`);
- :mod:`.schema`, :mod:`.validate`: the layout and types (the ``meds`` package's schemas) and a
  full validation with errors naming file, column and row (:func:`validate_meds_dataset`);
- :mod:`.reader`: streaming shards in batches of whole subjects;
- :mod:`.vocabulary`: federated feature agreement from thresholded code counts
  (:func:`local_code_counts`, :func:`choose_vocabulary`, :class:`Vocabulary`);
- :mod:`.tabularise`: window aggregations before each prediction time, never after it;
- :mod:`.splits`: ``subject_splits.parquet`` or a seeded split, always by subject;
- :mod:`.site`: :func:`load_meds_site`; :mod:`.check`: :func:`check_meds_site`;
- :mod:`.synth`: the synthetic EHR consortium written as MEDS (:func:`write_synth_meds`);
  :mod:`.writer`: writing MEDS datasets and label files.

Nothing here imports Flower: the federated layer carries the count messages and the vocabulary.
"""

from fedmeta.common.data.meds.check import check_meds_site
from fedmeta.common.data.meds.config import (
    Aggregations,
    MedsSiteConfig,
    load_meds_site_config,
    parse_meds_site,
)
from fedmeta.common.data.meds.site import MedsFeatures, load_meds_site, tabularise_site
from fedmeta.common.data.meds.validate import MedsDatasetInfo, validate_meds_dataset
from fedmeta.common.data.meds.vocabulary import (
    Vocabulary,
    choose_vocabulary,
    count_codes,
    local_code_counts,
    local_numeric_counts,
    site_vocabulary,
)

__all__ = [
    "Aggregations",
    "MedsDatasetInfo",
    "MedsFeatures",
    "MedsSiteConfig",
    "Vocabulary",
    "check_meds_site",
    "choose_vocabulary",
    "count_codes",
    "load_meds_site",
    "load_meds_site_config",
    "local_code_counts",
    "local_numeric_counts",
    "parse_meds_site",
    "site_vocabulary",
    "tabularise_site",
    "validate_meds_dataset",
]
