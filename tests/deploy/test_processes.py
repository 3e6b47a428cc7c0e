"""Process management: everything started (and everything it spawned) is stopped by PID."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from fedmeta.deploy.processes import Processes, descendants


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_stop_kills_the_process_and_its_children(tmp_path: Path) -> None:
    # A parent that starts a child in a new session (as flower-superlink does with its SuperExec).
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
        " start_new_session=True)\n"
        "time.sleep(120)\n"
    )
    with Processes(tmp_path) as procs:
        m = procs.start("parent", [sys.executable, "-c", script])
        deadline = time.monotonic() + 10
        kids: list[int] = []
        while time.monotonic() < deadline and not kids:
            kids = descendants(m.pid)
            time.sleep(0.05)
        assert kids, "the child never appeared"
        procs.refresh_children()
        recorded = json.loads((tmp_path / "pids.json").read_text())
        assert recorded["parent"]["pid"] == m.pid
        assert set(kids) <= set(recorded["parent"]["children"])
    assert not _alive(m.pid)
    assert not any(_alive(k) for k in kids)
    assert procs.leftovers() == []


def test_stop_all_runs_even_when_the_body_raises(tmp_path: Path) -> None:
    procs = Processes(tmp_path)
    try:
        with procs:
            m = procs.start("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"])
            raise RuntimeError("test body failed")
    except RuntimeError:
        pass
    assert not _alive(m.pid)
    assert m.popen.returncode is not None
    assert os.path.exists(tmp_path / "logs" / "sleeper.log")
