"""The bundle's preprocessing transforms exactly as training did, and names every difference."""

import numpy as np
import pandas as pd
import pytest

from fedmeta.common.data import heart
from fedmeta.common.data.ehr import load_ehr_cohort, read_table
from fedmeta.common.data.schema import load_schema
from fedmeta.common.data.synth_ehr import write_synth_ehr
from fedmeta.common.errors import DataError
from fedmeta.common.preprocessing import (
    EhrPreprocessing,
    HeartPreprocessing,
    ImagePreprocessing,
    preprocessing_from_dict,
)


def _hospital_rows(name: str) -> tuple[pd.DataFrame, pd.DataFrame, object]:
    site = heart.load_hospital(name)
    frame = heart.load_frame()
    rows = frame[frame["dataset"] == name].set_index("id", drop=False)
    return rows.loc[list(site.row_ids_train)], rows.loc[list(site.row_ids_test)], site


@pytest.mark.parametrize("name", ["Cleveland", "Switzerland"])
def test_heart_twin_transforms_exactly_like_load_hospital(name):
    train, test, site = _hospital_rows(name)
    pre = HeartPreprocessing.fit(train)
    assert np.array_equal(pre.transform(train), site.x_train)
    assert np.array_equal(pre.transform(test), site.x_test)
    again = preprocessing_from_dict(pre.to_dict())
    assert again == pre and np.array_equal(again.transform(test), site.x_test)


def test_heart_reordered_and_extra_columns_are_fine_and_noted():
    train, test, _ = _hospital_rows("Hungary")
    pre = HeartPreprocessing.fit(train)
    shuffled = test[list(reversed(test.columns))]
    assert np.array_equal(pre.transform(shuffled), pre.transform(test))
    notes = pre.check(test, source="new.csv")
    assert notes and "ignored" in notes[0] and "'dataset'" in notes[0] and "'num'" in notes[0]


@pytest.mark.parametrize("edit, match", [
    (lambda f: f.drop(columns=["chol", "cp"]), r"column\(s\) 'cp', 'chol' that the model needs are missing"),
    (lambda f: f.rename(columns={"age": "Age"}), r"'age' looks like 'Age'"),
    (lambda f: f.assign(cp="angina"), r"column 'cp' holds 'angina', not among the levels"),
    (lambda f: f.assign(sex="M"), r"column 'sex' holds 'M'.*'Male', 'Female'"),
    (lambda f: f.assign(fbs="maybe"), r"column 'fbs' holds 'MAYBE'; the model expects TRUE/FALSE"),
    (lambda f: f.assign(chol=np.nan), r"'chol'.* are empty in row\(s\) \[1, 2, 3"),
    (lambda f: f.assign(oldpeak="1,5"), r"column 'oldpeak' row 1 holds '1,5', not a number"),
])
def test_heart_differences_are_named(edit, match):
    train, test, _ = _hospital_rows("Cleveland")
    pre = HeartPreprocessing.fit(train)
    with pytest.raises(DataError, match=match):
        pre.transform(edit(test.copy()), source="new.csv")


@pytest.fixture(scope="module")
def ehr_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    paths = write_synth_ehr(root, sites=1, seed=3, mean_stays=120)
    data = paths[0].parent / "stays.csv"
    schema = load_schema(root / "schema.yaml")
    cohort = load_ehr_cohort(data, schema, ["mortality", "aki"], name="h1", id_column="stay_id")
    frame, _ = read_table(data)
    return schema, cohort, frame


def test_ehr_bundle_preprocessing_transforms_exactly_like_the_cohort_loader(ehr_site):
    schema, cohort, frame = ehr_site
    pre = EhrPreprocessing.from_preprocessor(schema, cohort.preprocessor, missing_indicators=True)
    test = frame.iloc[cohort.test_rows]
    assert np.array_equal(pre.transform(test), cohort.site.x_test)
    assert pre.feature_names == cohort.site.feature_names
    assert np.array_equal(pre.transform(test[list(reversed(test.columns))]), cohort.site.x_test)
    again = preprocessing_from_dict(pre.to_dict())
    assert np.array_equal(again.transform(test), cohort.site.x_test)


def test_ehr_unseen_categories_are_all_listed(ehr_site):
    schema, cohort, frame = ehr_site
    pre = EhrPreprocessing.from_preprocessor(schema, cohort.preprocessor, missing_indicators=True)
    test = frame.iloc[cohort.test_rows].copy()
    test["sex"] = ["female", "male"] * (len(test) // 2) + ["F"] * (len(test) % 2)
    with pytest.raises(DataError, match=r"column 'sex' holds 'female', 'male', not among the categories \['F', 'M'\]"):
        pre.transform(test, source="new.csv")
    with pytest.raises(DataError, match=r"'heart_rate', 'sys_bp' that the model needs are missing"):
        pre.transform(frame.drop(columns=["heart_rate", "sys_bp"]), source="new.csv")
    with pytest.raises(DataError, match=r"'stay_id' that the model needs are missing"):
        pre.check(frame.drop(columns=["stay_id"]), source="new.csv", id_column="stay_id")


def test_images_size_and_layout():
    pre = ImagePreprocessing(1, 28, 28)
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    nchw = pre.transform(u8)
    assert nchw.shape == (3, 1, 28, 28) and np.allclose(nchw[:, 0], u8 / 255.0)
    assert np.array_equal(pre.transform(nchw), nchw)  # already (N, C, H, W) in [0, 1]
    with pytest.raises(DataError, match=r"images are 32x32 with 1 channel\(s\); this model was fitted on 28x28 with 1"):
        pre.transform(np.zeros((2, 32, 32), dtype=np.uint8), source="scans.npy")
    with pytest.raises(DataError, match="3 channel"):
        pre.transform(np.zeros((2, 28, 28, 3), dtype=np.uint8))
    norm = ImagePreprocessing(1, 28, 28, (0.5,), (0.25,))
    assert np.allclose(norm.transform(nchw), (nchw - 0.5) / 0.25)
    assert preprocessing_from_dict(norm.to_dict()) == norm


def test_unknown_kind_and_bad_statistics_are_refused():
    with pytest.raises(ValueError, match="unknown preprocessing kind 'tsv'"):
        preprocessing_from_dict({"kind": "tsv"})
    with pytest.raises(ValueError, match="needs 13 means"):
        preprocessing_from_dict({"kind": "fed-heart", "mean": [0.0], "std": [1.0]})
    with pytest.raises(ValueError, match="per-channel mean/std"):
        ImagePreprocessing(3, 8, 8, (0.5,), (0.2,))


def test_constructors_from_what_a_site_has_loaded(tmp_path):
    from fedmeta.common.data.base import ImageSite
    from fedmeta.common.data.ehr import load_ehr_site
    from fedmeta.common.data.site_config import load_site_config

    site = heart.load_hospital("VA Long Beach")
    pre = HeartPreprocessing.for_site(site)
    _, test, _ = _hospital_rows("VA Long Beach")
    assert np.array_equal(pre.transform(test), site.x_test)
    paths = write_synth_ehr(tmp_path, sites=1, seed=4, mean_stays=80)
    config = load_site_config(paths[0])
    cohort = load_ehr_site(config)
    ehr = EhrPreprocessing.from_site_config(config, cohort)
    frame, _ = read_table(config.path)
    assert np.array_equal(ehr.transform(frame.iloc[cohort.test_rows]), cohort.site.x_test)
    images = ImageSite("s", np.zeros((4, 3, 16, 20), np.float32), np.zeros(4, np.int64),
                       np.zeros((1, 3, 16, 20), np.float32), np.zeros(1, np.int64), ("a",))
    assert ImagePreprocessing.for_site(images) == ImagePreprocessing(3, 16, 20)
