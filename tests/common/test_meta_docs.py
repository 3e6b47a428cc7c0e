"""The usage examples in the engine's docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib
from collections.abc import Iterator

import pytest

from tests.common.reference import single_thread

MODULES = [
    "fedmeta.common.models",
    "fedmeta.common.meta.inner",
    "fedmeta.common.meta.reptile",
    "fedmeta.common.meta.maml",
    "fedmeta.common.meta.metasgd",
    "fedmeta.common.meta.protonet",
    "fedmeta.common.meta.matching",
    "fedmeta.common.meta.relation",
    "fedmeta.common.data.episodes",
    "fedmeta.bench.sine_tasks",
]


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
