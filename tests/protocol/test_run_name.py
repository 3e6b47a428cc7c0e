"""A run's name: made once, checked once, for simulate, run, deploy local and the ServerApp."""

from __future__ import annotations

import pytest

from fedmeta.common.errors import ConfigError
from fedmeta.protocol import run_name


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "-x", ".hidden", "x" * 101, "naïve", "a b"])
def test_a_name_that_could_be_a_path_or_odd_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="run name"):
        run_name.check(bad)


def test_a_new_name_is_the_prefix_and_the_time_and_passes_its_own_check() -> None:
    name = run_name.new("reptile")
    assert run_name.PATTERN.match(name) and name.startswith("reptile-") and len(name) == len("reptile-") + 15
    assert run_name.chosen("", "glm").startswith("glm-")
    assert run_name.chosen("my.run_1", "glm") == "my.run_1"
    with pytest.raises(ConfigError):
        run_name.chosen("../x", "glm")
