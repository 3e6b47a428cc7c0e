"""The coordinator's SuperLink entry point and ServerApp executor, without starting servers (the
deployment tests run both against real SuperNodes)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fedmeta.common.errors import ProvisionError
from fedmeta.deploy import serverexec, superlink


def test_the_flower_entry_points_the_superlink_wrapper_calls_are_present() -> None:
    assert superlink.patch_points_present()


def test_a_socket_path_too_long_for_a_unix_socket_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 120) / "superlink.sock"
    with pytest.raises(ProvisionError, match=r"superlink\.sock: the Control API socket's path is longer than 107"):
        superlink.check_socket_path(path)
    superlink.check_socket_path(tmp_path / "superlink.sock")


def test_the_socket_is_owner_only_and_a_stale_one_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "superlink.sock"
    first = superlink.bind(path)
    first.close()  # a SuperLink killed without cleaning up leaves its socket file
    second = superlink.bind(path)
    try:
        assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        second.close()


def test_an_accepted_run_gets_the_fedmeta_bundle_s_own_defaults_and_its_overrides() -> None:
    cfg = serverexec.run_config({"run-name": "exp1", "resume": True}, secure_aggregation=False)
    assert cfg == {"experiment": "", "config": "", "set": "", "run-name": "exp1", "resume": True}
    with pytest.raises(ValueError):  # a key the fedmeta bundle does not declare
        serverexec.run_config({"out": "/tmp/x"}, secure_aggregation=False)
