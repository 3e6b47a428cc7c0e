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


def test_a_live_supernode_that_stopped_serving_is_killed_and_restarted(tmp_path: Path, monkeypatch) -> None:
    """The site supervisor restarts a SuperNode that is alive but does not serve its Runtime API:
    one that never opens it (past the start-up allowance), one that opened it and closed it
    (Flower 1.39 can hang in its own shutdown after giving up reconnecting); a serving one is
    left alone."""
    import socket
    import threading

    from fedmeta.deploy import site as S
    from fedmeta.sitecore.audit import SiteAudit, read_log

    monkeypatch.setattr(S, "STARTUP_S", 1.5)
    monkeypatch.setattr(S, "CLOSED_S", 1.0)
    monkeypatch.setattr(S, "CHECK_S", 0.5)
    monkeypatch.setattr(S, "BACKOFF_S", (0.2,))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    listen = f"import socket, threading, time\ns = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()\n"
    never_opens = "import time; time.sleep(120)"
    closes = listen + "time.sleep(2.0); s.close(); time.sleep(120)\n"
    serves = listen + "while True:\n    c, _ = s.accept(); c.close()\n"
    runner = S.SiteRunner.__new__(S.SiteRunner)
    runner.node = type("Node", (), {"site": "test-site"})()  # only its name is read here
    runner.runtime_port, runner.max_restarts, runner.restarts, runner.refusals = port, None, 0, 0
    runner.say, runner.state = (lambda text: None), tmp_path
    runner.audit = SiteAudit(tmp_path / "audit.jsonl")
    runner.procs = Processes(tmp_path / "run")
    runner._stop = threading.Event()
    scripts = iter([never_opens, closes, serves])
    started: list[object] = []

    def start_node() -> None:
        runner.node_process = runner.procs.start("supernode", [sys.executable, "-c", next(scripts)])
        started.append(runner.node_process)

    runner._start_node = start_node  # type: ignore[method-assign]
    start_node()
    thread = threading.Thread(target=runner.supervise)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while runner.restarts < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(4.0)  # the serving one gets more than both allowances and must be kept
        assert runner.restarts == 2 and len(started) == 3
        assert not started[0].alive() and not started[1].alive() and started[2].alive()  # type: ignore[attr-defined]
    finally:
        runner._stop.set()
        thread.join(timeout=10)
        runner.procs.stop_all()
    events = [e for e in read_log(tmp_path / "audit.jsonl") if e["event"] == "node_restarted"]
    assert [(e["attempt"], e["reason"]) for e in events] == [(1, S.UNRESPONSIVE), (2, S.UNRESPONSIVE)]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "retrying" and status["reason"] == S.UNRESPONSIVE
