"""Fed-Heart-Disease preparation against FLamby's recipe and hand-checked counts."""

import numpy as np
import pandas as pd
import pytest

from fedmeta.common.data import heart
from fedmeta.common.errors import DataError

# After dropping slope/ca/thal and incomplete rows (FLamby: 740 rows).
ROWS = {"Cleveland": 304, "Hungary": 260, "Switzerland": 46, "VA Long Beach": 130}


def test_rows_per_hospital_after_cleaning():
    frame = heart.load_frame()
    assert len(frame) == 740
    assert frame["dataset"].value_counts().to_dict() == ROWS


@pytest.mark.parametrize("name", heart.HOSPITALS)
def test_split_sizes_features_and_labels(name):
    site = heart.load_hospital(name)
    n = ROWS[name]
    assert site.n_train + site.n_test == n
    assert site.n_train == int(np.floor(0.66 * n)) or site.n_train == int(np.ceil(0.66 * n))
    assert site.x_train.shape[1] == 13 == len(site.feature_names)
    assert site.x_train.dtype == np.float32 and site.y_train.dtype == np.int64
    assert set(np.unique(site.y_train)) <= {0, 1}
    raw = heart.load_frame()
    raw = raw[raw["dataset"] == name]
    assert site.y_train.sum() + site.y_test.sum() == int((raw["num"] > 0).sum())


def test_standardised_with_training_statistics_only():
    site = heart.load_hospital("Cleveland")
    np.testing.assert_allclose(site.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(site.x_train.std(axis=0), 1.0, atol=1e-4)
    # The test split is scaled with the training statistics, so its mean is not exactly 0.
    assert np.abs(site.x_test.mean(axis=0)).max() > 1e-3


def test_no_test_row_in_training_split():
    frame = heart.load_frame()
    for name in heart.HOSPITALS:
        site = heart.load_hospital(name)
        assert not set(site.row_ids_train) & set(site.row_ids_test)
        assert sorted(site.row_ids_train + site.row_ids_test) == sorted(frame[frame["dataset"] == name]["id"])
        # Row ids follow the same split as the features: a test row's features are never among the
        # training rows, except VA Long Beach's one patient recorded twice under two ids.
        train = {tuple(np.round(r, 4)) for r in site.x_train}
        shared = sum(tuple(np.round(r, 4)) in train for r in site.x_test)
        assert shared == (1 if name == "VA Long Beach" else 0)


def test_one_hot_drops_first_level():
    assert "cp=typical angina" not in heart.FEATURES
    assert "restecg=normal" not in heart.FEATURES
    assert heart.FEATURES[8:] == (
        "cp=atypical angina", "cp=non-anginal", "cp=asymptomatic",
        "restecg=st-t abnormality", "restecg=lv hypertrophy",
    )


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        heart.load_hospital("Cleveland", path=tmp_path / "nope.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="cannot parse"):
        heart.load_hospital("Cleveland", path=empty)
    frame = pd.read_csv(heart.default_csv()).drop(columns=["chol"])
    nochol = tmp_path / "nochol.csv"
    frame.to_csv(nochol, index=False)
    with pytest.raises(DataError, match="missing column 'chol'"):
        heart.load_hospital("Cleveland", path=nochol)
    with pytest.raises(DataError, match="unknown Fed-Heart-Disease hospital"):
        heart.load_hospital("Mars General")
