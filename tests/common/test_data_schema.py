"""Schema parsing, encoding and preprocessing, checked against numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedmeta.common.data.schema import (
    Feature,
    Schema,
    encode,
    fit_preprocessor,
    infer_schema,
    load_schema,
    save_schema,
    schema_from_dict,
)
from fedmeta.common.errors import ConfigError, DataError

SCHEMA = Schema(
    (
        Feature("age", "numeric"),
        Feature("sex", "categorical", ("F", "M")),
        Feature("lactate", "numeric"),
    )
)


def test_encoded_layout_numeric_then_onehot_then_indicators() -> None:
    assert SCHEMA.encoded_names(missing_indicators=True) == (
        "age",
        "lactate",
        "sex=F",
        "sex=M",
        "age__missing",
        "lactate__missing",
    )
    assert SCHEMA.width(missing_indicators=False) == 4


def test_encode_by_hand() -> None:
    frame = pd.DataFrame(
        {"age": ["70", "", "50"], "sex": ["M", "F", None], "lactate": ["1.5", "2", None]}
    )
    x = encode(frame, SCHEMA, source="t.csv", missing_indicators=True)
    nan = np.nan
    expected = np.array(
        [
            [70, 1.5, 0, 1, 0, 0],
            [nan, 2.0, 1, 0, 1, 0],
            [50, nan, 0, 0, 0, 1],
        ]
    )
    np.testing.assert_array_equal(x, expected)


def test_preprocessor_uses_training_rows_only() -> None:
    # training rows: age 40, 60, missing, 80 -> median 60, mean 60, std sqrt(800/3)
    x_train = np.array(
        [[40.0, 1.0, 1, 0], [60.0, np.nan, 0, 1], [np.nan, 3.0, 1, 0], [80.0, 2.0, 0, 1]]
    )
    x_test = np.array([[1000.0, np.nan, 1, 0]])  # an outlier that must not move the statistics
    pre = fit_preprocessor(x_train, SCHEMA)
    np.testing.assert_allclose(pre.median, [60.0, 2.0])
    np.testing.assert_allclose(pre.mean, [60.0, 2.0])
    np.testing.assert_allclose(pre.std, [np.sqrt(800 / 3), np.sqrt(2 / 3)])
    out = pre.transform(x_test)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], [(1000 - 60) / np.sqrt(800 / 3), 0.0, 1, 0], rtol=1e-6)
    assert np.isnan(x_test[0, 1])  # the input is not modified


def test_preprocessor_constant_and_empty_columns() -> None:
    x = np.array([[5.0, np.nan, 0, 1], [5.0, np.nan, 1, 0]])
    pre = fit_preprocessor(x, SCHEMA)
    np.testing.assert_allclose(pre.std, [1.0, 1.0])
    np.testing.assert_allclose(pre.transform(x)[:, :2], [[0, 0], [0, 0]])


def test_non_numeric_value_names_column_row_and_value() -> None:
    frame = pd.DataFrame({"age": ["70", "seventy"], "sex": ["M", "F"], "lactate": ["1", "2"]})
    with pytest.raises(
        DataError, match=r"t\.csv: column 'age' .* row 2 \(line 3\) holds 'seventy'"
    ):
        encode(frame, SCHEMA, source="t.csv", line_offset=2)


def test_category_outside_schema_names_row() -> None:
    frame = pd.DataFrame({"age": [1, 2, 3], "sex": ["M", "F", "X"], "lactate": [1, 2, 3]})
    with pytest.raises(DataError, match=r"column 'sex' row 3 holds 'X'.*\['F', 'M'\]"):
        encode(frame, SCHEMA, source="t.parquet")


def test_missing_feature_column() -> None:
    frame = pd.DataFrame({"age": [1], "sex": ["M"]})
    with pytest.raises(DataError, match=r"t\.csv: feature column\(s\) \['lactate'\] are missing"):
        encode(frame, SCHEMA, source="t.csv")


def test_integer_codes_read_with_gaps_match_schema_categories() -> None:
    schema = Schema((Feature("cp", "categorical", ("1", "2")),))
    frame = pd.DataFrame({"cp": [1.0, np.nan, 2.0]})
    np.testing.assert_array_equal(encode(frame, schema, source="t"), [[1, 0], [0, 0], [0, 1]])


def test_schema_yaml_round_trip(tmp_path) -> None:
    path = tmp_path / "schema.yaml"
    save_schema(SCHEMA, path)
    assert load_schema(path) == SCHEMA


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"features": [{"name": "a", "type": "text"}]}, r"type 'text' is not one of"),
        ({"features": [{"name": "a", "type": "categorical"}]}, r"needs a non-empty 'categories'"),
        (
            {"features": [{"name": "a", "type": "numeric", "unit": "mg"}]},
            r"unknown key\(s\) \['unit'\]",
        ),
        (
            {"features": [{"name": "a", "type": "numeric"}, {"name": "a", "type": "numeric"}]},
            r"\['a'\] more than once",
        ),
        ({"feature": []}, r"exactly one key 'features'"),
        ({"features": [{"name": "a", "type": "numeric", "categories": ["x"]}]}, r"takes no"),
    ],
)
def test_bad_schema_rejected(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        schema_from_dict(data, source="schema.yaml")


def test_missing_schema_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"schema file .*nope\.yaml does not exist"):
        load_schema(tmp_path / "nope.yaml")


def test_infer_schema() -> None:
    frame = pd.DataFrame({"a": ["1", None, "2.5"], "b": ["x", "y", None]})
    assert infer_schema(frame, ["a", "b"]) == Schema(
        (Feature("a", "numeric"), Feature("b", "categorical", ("x", "y")))
    )
