"""No outbound connection but the Fleet API: Flower's telemetry is off in every fedmeta process.

Flower reads ``FLWR_TELEMETRY_ENABLED`` (default "1") once, when its telemetry module is
imported, and then posts an event for every SuperLink, SuperNode and simulation start. Each test
runs a fresh interpreter with the variable unset and records what Flower's ``event`` would send
(``urlopen`` replaced, so nothing leaves the machine either way); the control arm, which does
not import fedmeta first, shows that Flower would have posted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import sys, urllib.error, urllib.request
calls = []
def urlopen(request, *args, **kwargs):
    calls.append(request.full_url)
    raise urllib.error.URLError("blocked by the test")
urllib.request.urlopen = urlopen
if sys.argv[1] == "fedmeta":
    import fedmeta.cli.main  # what every fedmeta command imports first
from flwr.supercore.telemetry import EventType, event
event(EventType.PING).result()
print("posted" if calls else "silent", calls[:1])
"""


def _probe(first: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("FLWR_TELEMETRY_ENABLED",)}
    out = subprocess.run([sys.executable, "-c", PROBE, first], env={**base, **env}, capture_output=True,
                         text=True, timeout=120, check=True)
    return out.stdout.strip()


def test_control_flower_alone_posts_a_telemetry_event() -> None:
    assert _probe("flower").startswith("posted ['https://telemetry.flower.ai/")


def test_a_fedmeta_process_posts_nothing_unless_the_operator_opts_in() -> None:
    assert _probe("fedmeta") == "silent []"
    assert _probe("fedmeta", FLWR_TELEMETRY_ENABLED="1").startswith("posted")  # the operator's choice


@pytest.mark.parametrize("opt_in", [None, "1"])
def test_every_flower_process_fedmeta_starts_inherits_the_switch(opt_in: str | None, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmeta.deploy.launch import base_env

    if opt_in is None:
        monkeypatch.delenv("FLWR_TELEMETRY_ENABLED", raising=False)
    else:
        monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", opt_in)
    env = base_env(tmp_path)
    assert env["FLWR_TELEMETRY_ENABLED"] == (opt_in or "0")
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
