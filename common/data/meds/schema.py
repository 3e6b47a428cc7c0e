"""MEDS file layout and column types, checked with the ``meds`` package's own pyarrow schemas.

A MEDS dataset (Medical Event Data Standard, ``meds`` 0.4) is a folder::

    ROOT/data/**/*.parquet              event shards: subject_id, time, code, numeric_value[, text_value]
    ROOT/metadata/dataset.json          dataset name, ETL, MEDS version (all fields optional)
    ROOT/metadata/codes.parquet         code, description, parent_codes (optional here)
    ROOT/metadata/subject_splits.parquet   subject_id, split (optional here)

Label files (one per prediction task) hold ``subject_id, prediction_time, boolean_value``.

Types are checked against :class:`meds.DataSchema`, :class:`meds.LabelSchema`,
:class:`meds.SubjectSplitSchema` and :class:`meds.CodeMetadataSchema` on the Parquet schema alone
(no row is read). Two departures, both lossless: ``code`` may also be stored as ``large_string``
or dictionary-encoded strings, and ``text_value`` is not checked because fedmeta never reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import meds
import pyarrow as pa
import pyarrow.parquet as pq
from flexible_schema.exceptions import SchemaValidationError, TableValidationError

from fedmeta.common.errors import DataError

DATA_DIR = meds.data_subdirectory
DATASET_JSON = Path(meds.dataset_metadata_filepath)
CODES_PARQUET = Path(meds.code_metadata_filepath)
SPLITS_PARQUET = Path(meds.subject_splits_filepath)
BIRTH_CODE = meds.birth_code
DEATH_CODE = meds.death_code
TRAIN_SPLIT, TUNING_SPLIT, HELD_OUT_SPLIT = meds.train_split, meds.tuning_split, meds.held_out_split

_STRINGS = (pa.string(), pa.large_string())


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return t.value_type in _STRINGS
    return t in _STRINGS


def parquet_schema(path: Path) -> pa.Schema:
    """The Arrow schema of a Parquet file, or :class:`DataError` saying why it cannot be read."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e


def _check(schema_cls: Any, path: Path, schema: pa.Schema, what: str, tolerated: set[str]) -> None:
    try:
        schema_cls.validate(schema)
    except SchemaValidationError as e:
        if e.missing_req_cols:
            raise DataError(
                f"{path}: column(s) {e.missing_req_cols} missing; a MEDS {what} has columns "
                f"{schema_cls.required_columns()} (optional {schema_cls.optional_columns()}); "
                f"the file has {schema.names}"
            ) from e
        if e.disallowed_extra_cols:
            raise DataError(
                f"{path}: column(s) {e.disallowed_extra_cols} are not allowed in a MEDS {what} "
                f"(allowed: {schema_cls.columns()})"
            ) from e
        for col, want, got in e.mistyped_cols or []:
            if col in tolerated:
                continue
            if col == "code" and _is_string(got):
                continue
            raise DataError(
                f"{path}: column {col!r} has type {got}; a MEDS {what} needs {want}. Hint: cast "
                f"it in the ETL (e.g. pyarrow: table.cast(meds.{schema_cls.__name__}.schema()))"
            ) from e


def check_data_schema(path: Path) -> pa.Schema:
    """Check an event shard's columns and types against :class:`meds.DataSchema`."""
    schema = parquet_schema(path)
    _check(meds.DataSchema, path, schema, "data shard", {"text_value"})
    return schema


def check_label_schema(path: Path) -> pa.Schema:
    """Check a label file against :class:`meds.LabelSchema`; fedmeta's binary tasks also need
    ``boolean_value``."""
    schema = parquet_schema(path)
    _check(meds.LabelSchema, path, schema, "label file", set())
    if "boolean_value" not in schema.names:
        raise DataError(
            f"{path}: column 'boolean_value' missing; fedmeta's tasks are binary and read the "
            f"label from boolean_value (the file has {schema.names})"
        )
    return schema


def check_splits_schema(path: Path) -> pa.Schema:
    """Check ``subject_splits.parquet`` against :class:`meds.SubjectSplitSchema`."""
    schema = parquet_schema(path)
    _check(meds.SubjectSplitSchema, path, schema, "subject split file", set())
    return schema


def check_codes_schema(path: Path) -> pa.Schema:
    """Check ``codes.parquet`` against :class:`meds.CodeMetadataSchema`."""
    schema = parquet_schema(path)
    _check(meds.CodeMetadataSchema, path, schema, "code metadata file", set())
    return schema


def data_shards(root: Path) -> list[Path]:
    """The dataset's event shards, ``ROOT/data/**/*.parquet`` in path order."""
    if not root.is_dir():
        raise DataError(
            f"{root}: MEDS dataset folder not found. Hint: 'path' in the site file names the "
            "dataset root, the folder holding data/ and metadata/"
        )
    data = root / DATA_DIR
    if not data.is_dir():
        raise DataError(f"{root}: no {DATA_DIR}/ folder; a MEDS dataset keeps its events in {data}")
    shards = sorted(p for p in data.rglob("*.parquet") if p.is_file())
    if not shards:
        raise DataError(f"{data}: no .parquet shard found")
    return shards


def read_dataset_metadata(root: Path) -> dict[str, Any]:
    """``metadata/dataset.json`` checked against :class:`meds.DatasetMetadataSchema`;
    ``{}`` when the file is absent (every field of it is optional in MEDS)."""
    path = root / DATASET_JSON
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    try:
        meds.DatasetMetadataSchema.validate(data)
    except (TableValidationError, SchemaValidationError) as e:
        cause = e.__cause__ or e
        detail = getattr(cause, "message", str(cause))
        raise DataError(f"{path}: does not match the MEDS dataset metadata schema: {detail}") from e
    return data
