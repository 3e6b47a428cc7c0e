"""Federated feature agreement: what a site sends holds only counts >= k; the coordinator's choice
by hand; the vocabulary's layout, JSON form and fingerprint."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from fedmeta.common.data.meds import vocabulary as V
from fedmeta.common.data.meds.config import Aggregations, MedsSiteConfig, parse_meds_site
from fedmeta.common.data.meds.vocabulary import (
    Vocabulary,
    choose_vocabulary,
    count_codes,
    local_code_counts,
    local_numeric_counts,
    site_vocabulary,
)
from fedmeta.common.data.meds.writer import write_labels, write_meds_dataset
from fedmeta.common.errors import ConfigError, DataError

T0 = np.datetime64("2020-01-01T00:00", "us")


def _site(root: Path) -> MedsSiteConfig:
    """Subjects 1-5 labelled at 10 h, subject 6 unlabelled. Per code, patients before 10 h:
    A 5 (subject 1 three times), B 2, C 3, N 4 (3 with a value), S 5 (static); FUT only at or after
    10 h; subject 6 has B and C."""
    rows: list[tuple[int, int | None, str, float | None]] = []
    for s in range(1, 7):
        rows.append((s, None, "S", None))
        rows += [(s, 1, "A", None)] * (3 if s == 1 else 1) if s <= 5 else []
        if s <= 2 or s == 6:
            rows.append((s, 2, "B", None))
        if s <= 3 or s == 6:
            rows.append((s, 3, "C", None))
        if s <= 4:
            rows.append((s, 4, "N", None if s == 4 else float(s)))
        rows += [(s, 10, "FUT", 1.0), (s, 11, "FUT", 2.0)]
    events = pa.table(
        {
            "subject_id": pa.array([r[0] for r in rows], pa.int64()),
            "time": pa.array([None if r[1] is None else T0 + np.timedelta64(r[1], "h") for r in rows],
                             pa.timestamp("us")),
            "code": pa.array([r[2] for r in rows], pa.string()),
            "numeric_value": pa.array([r[3] for r in rows], pa.float32()),
        }
    )
    write_meds_dataset(root / "meds", events, shard_subjects=4)
    labels = pa.table(
        {
            "subject_id": pa.array([1, 2, 3, 4, 5], pa.int64()),
            "prediction_time": pa.array([T0 + np.timedelta64(10, "h")] * 5, pa.timestamp("us")),
            "boolean_value": pa.array([True, False, False, True, False]),
        }
    )
    write_labels(root / "labels", {"y": labels})
    return parse_meds_site(
        {"kind": "meds", "path": "meds", "labels": {"y": "labels/y.parquet"}, "min_subjects": 3,
         "windows": ["12h", "all"]},
        source=root / "site.yaml",
    )


def test_exact_counts_are_patients_before_their_prediction_time(tmp_path: Path) -> None:
    c = count_codes(_site(tmp_path))
    assert c.subjects == {"A": 5, "B": 2, "C": 3, "N": 4, "S": 5}
    assert c.numeric == {"N": 3}
    assert c.n_subjects == 5


def test_the_message_holds_only_codes_seen_in_at_least_k_patients(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    message = local_code_counts(cfg)  # k from the site file: 3
    assert message == {"A": 5, "C": 3, "N": 4, "S": 5}
    assert all(n >= 3 for n in message.values())
    assert "B" not in message and "FUT" not in message  # absent, not zero
    assert local_numeric_counts(cfg) == {"N": 3}
    message = local_code_counts(cfg, min_subjects=4)
    assert message == {"A": 5, "N": 4, "S": 5} and min(message.values()) >= 4
    assert local_numeric_counts(cfg, min_subjects=4) == {}
    with pytest.raises(ConfigError, match="min_subjects = 0: must be >= 1"):
        local_code_counts(cfg, min_subjects=0)


def test_site_vocabulary_uses_the_site_file(tmp_path: Path) -> None:
    v = site_vocabulary(_site(tmp_path))
    assert v.codes == ("A", "C", "N", "S") and v.numeric_codes == ("N",)
    assert v.windows == ("12h", "all")


SITES = [
    {"A": 100, "B": 50, "C": 30, "D": 25},
    {"A": 80, "C": 40, "E": 200},
    {"B": 60, "C": 20, "E": 30, "F": 500},
]


def test_choice_by_hand() -> None:
    # at >= 2 sites: A 180, B 110, C 90, E 230 (D and F are at one site only)
    v = choose_vocabulary(SITES, min_sites=2, top_n=3)
    assert v.codes == ("A", "B", "E")
    assert v.numeric_codes == ("A", "B", "E")  # no numeric messages: every code gets values
    assert choose_vocabulary(SITES, min_sites=2, top_n=10).codes == ("A", "B", "C", "E")
    assert choose_vocabulary(SITES, min_sites=3, top_n=10).codes == ("C",)
    assert choose_vocabulary(SITES, min_sites=1, top_n=2).codes == ("E", "F")
    numeric = [{"A": 90}, {}, {"E": 25, "F": 400}]
    assert choose_vocabulary(SITES, min_sites=2, top_n=3, numeric_counts=numeric).numeric_codes == ("A", "E")


def test_choice_ignores_site_order_and_breaks_ties_by_code() -> None:
    prints = {
        choose_vocabulary(list(p), min_sites=2, top_n=3).fingerprint()
        for p in itertools.permutations(SITES)
    }
    assert len(prints) == 1
    assert choose_vocabulary([{"Y": 10, "X": 10}], min_sites=1, top_n=1).codes == ("X",)


def test_birth_is_never_numeric() -> None:
    v = choose_vocabulary([{"MEDS_BIRTH": 30, "HR": 30}], min_sites=1)
    assert v.numeric_codes == ("HR",)
    assert v.feature_names()[-1] == "MEDS_BIRTH/age_years"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"min_sites": 0}, ConfigError, r"min_sites = 0: must be between 1 and the number of sites \(3\)"),
        ({"min_sites": 4}, ConfigError, r"min_sites = 4"),
        ({"min_sites": 1, "top_n": 0}, ConfigError, r"top_n = 0: must be >= 1"),
        ({"min_sites": 1, "min_subjects": 30}, DataError,
         r"site 0: code counts: code 'D' has count 25 < min_subjects 30; .* \(message refused\)"),
        ({"min_sites": 1, "numeric_counts": [{}]}, ConfigError, r"numeric_counts has 1 messages for 3 sites"),
        ({"min_sites": 1, "numeric_counts": [{}, {"A": True}, {}]}, DataError,
         r"site 1: numeric counts: code 'A' has count True"),
    ],
)
def test_bad_arguments_and_messages(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        choose_vocabulary(SITES, **kwargs)


def test_bad_counts_in_a_message() -> None:
    for bad, match in (({"A": -3}, "count -3"), ({"A": 2.5}, "count 2.5"), ({"": 3}, "code ''"),
                       (["A"], "is a list")):
        with pytest.raises(DataError, match=match):
            choose_vocabulary([bad], min_sites=1)  # type: ignore[list-item]
    with pytest.raises(DataError, match="no code is reported by at least 2 of 2 sites"):
        choose_vocabulary([{"A": 5}, {"B": 5}], min_sites=2)
    with pytest.raises(ConfigError, match="no site counts"):
        choose_vocabulary([], min_sites=1)


VOCAB = Vocabulary(
    codes=("A", "MEDS_BIRTH", "N"),
    numeric_codes=("N",),
    windows=("24h", "all"),
    aggregations=Aggregations(numeric=("last", "count"), other=("present",)),
)


def test_layout_by_hand() -> None:
    assert VOCAB.feature_names() == (
        "24h/A/present", "24h/N/last", "24h/N/count",
        "all/A/present", "all/N/last", "all/N/count",
        "MEDS_BIRTH/age_years",
    )
    assert VOCAB.width == 7


def test_json_round_trip_and_a_pinned_fingerprint() -> None:
    text = VOCAB.to_json()
    canonical = ('{"aggregations":{"numeric":["last","count"],"other":["present"]},'
                 '"codes":["A","MEDS_BIRTH","N"],"format":1,"numeric_codes":["N"],'
                 '"windows":["24h","all"]}')
    assert text == canonical  # the bytes every site hashes
    assert VOCAB.fingerprint() == hashlib.sha256(canonical.encode()).hexdigest()
    back = Vocabulary.from_json(text)
    assert back == VOCAB and back.fingerprint() == VOCAB.fingerprint()
    other = VOCAB.model_copy(update={"windows": ("24h",)})
    assert other.fingerprint() != VOCAB.fingerprint()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("not json", r"vocabulary JSON: \(document\)"),
        ('{"codes":["B","A"]}', r"vocabulary JSON: codes: codes must be unique and sorted"),
        ('{"codes":[]}', r"codes: a vocabulary needs at least one code"),
        ('{"codes":["A"],"numeric_codes":["Z"]}', r"numeric_codes \['Z'\] are not among the codes"),
        ('{"codes":["A"],"windows":["5x"]}', r"windows: '5x': a window is 'all'"),
        ('{"codes":["A"],"format":2}', r"format: Input should be 1"),
        ('{"codes":["A"],"extra":1}', r"extra: Extra inputs are not permitted"),
    ],
)
def test_bad_vocabulary_json(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Vocabulary.from_json(text)


def test_subjects_per_code_in_groups_matches_np_unique(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    run = np.sort(rng.integers(0, 50, 2000))
    code = rng.integers(0, 7, 2000).astype(np.int32)
    pairs = np.unique(run * 7 + code)
    want = np.bincount(pairs % 7, minlength=7)
    for cells in (1 << 24, 7 * 4, 1):  # one group, groups of 4 runs, one run per group
        monkeypatch.setattr(V, "_PAIR_CELLS", cells)
        np.testing.assert_array_equal(V._subjects_per_code(run, code, 50, 7), want)
