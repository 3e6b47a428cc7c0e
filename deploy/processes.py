"""Start and always stop the Flower processes of a deployment, by process id.

Flower's ``flower-superlink`` and ``flower-supernode`` start helpers of their own
(``flower-superexec``, which starts ``flwr-serverapp`` / ``flwr-clientapp``), some of them in new
sessions, so stopping only the process we started can leave its helpers behind. :class:`Processes`
therefore starts each command as the leader of a new session, records its PID (and the PIDs of
everything it spawned, read from ``/proc`` at stop time) in ``pids.json``, and on :meth:`stop`
sends SIGTERM to each recorded PID, waits, then SIGKILL to whatever is left. It is a context
manager: leaving the ``with`` block stops everything, pass or fail.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from fedmeta.common.errors import ProvisionError

log = logging.getLogger(__name__)


@dataclass
class Managed:
    """One started process: its name, PID, log file and Popen handle."""

    name: str
    pid: int
    log_path: Path
    popen: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.popen.poll() is None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (one of another user counts; a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (its parent has not reaped it) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def _children_map() -> dict[int, list[int]]:
    """Parent PID -> child PIDs for every process visible in ``/proc`` (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name, which may contain spaces.
        rest = stat[stat.rfind(")") + 2 :].split()
        if len(rest) >= 2:
            children.setdefault(int(rest[1]), []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (children first, then theirs)."""
    tree = _children_map()
    out: list[int] = []
    frontier = [pid]
    while frontier:
        nxt: list[int] = []
        for p in frontier:
            for c in tree.get(p, []):
                if c not in out:
                    out.append(c)
                    nxt.append(c)
        frontier = nxt
    return out


def _is_zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].split()[0] in ("Z", "X")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Processes:
    """The processes of one deployment, recorded in ``run_dir/pids.json``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        self.procs: dict[str, Managed] = {}
        self._known_children: dict[str, set[int]] = {}

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def _record(self) -> None:
        doc = {
            name: {
                "pid": m.pid,
                "children": sorted(self._known_children.get(name, set())),
                "alive": m.alive(),
                "log": str(m.log_path),
            }
            for name, m in self.procs.items()
        }
        path = self.run_dir / "pids.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        os.chmod(path, 0o600)

    def start(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> Managed:
        """Start ``argv`` with stdout and stderr in ``run_dir/logs/NAME.log`` (0600), handing it
        the file descriptors ``pass_fds`` (keys decrypted into memory)."""
        if name in self.procs and self.procs[name].alive():
            raise ProvisionError(f"process {name!r} is already running (pid {self.procs[name].pid})")
        log_path = self.run_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(log_path.parent, 0o700)
        full_env = dict(os.environ if env is None else env)
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "ab") as log_file:
            try:
                popen = subprocess.Popen(  # noqa: S603 - argv is built by this package
                    list(argv),
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=full_env,
                    start_new_session=True,
                    pass_fds=tuple(pass_fds),
                )
            except OSError as e:
                raise ProvisionError(f"cannot start {name}: {argv[0]}: {e}") from e
        managed = Managed(name=name, pid=popen.pid, log_path=log_path, popen=popen)
        self.procs[name] = managed
        self._record()
        log.info("started %s (pid %d): %s", name, popen.pid, " ".join(argv))
        return managed

    def refresh_children(self) -> None:
        """Remember the current descendants of each process (called while it runs)."""
        for name, m in self.procs.items():
            if m.alive():
                self._known_children.setdefault(name, set()).update(descendants(m.pid))
        self._record()

    def stop(self, name: str, *, timeout: float = 10.0) -> int | None:
        """Stop one process and every process it spawned; returns its exit code."""
        m = self.procs[name]
        pids = set(self._known_children.get(name, set()))
        if not m.alive() and all(_is_zombie_or_gone(p) for p in pids):
            return m.popen.returncode
        if m.alive():
            pids.update(descendants(m.pid))
            _signal(m.pid, signal.SIGTERM)
        for p in pids:
            _signal(p, signal.SIGTERM)
        try:
            m.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing", name, m.pid, timeout)
            _signal(m.pid, signal.SIGKILL)
            m.popen.wait(timeout=5)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not all(_is_zombie_or_gone(p) for p in pids):
            time.sleep(0.1)
        for p in pids:
            if not _is_zombie_or_gone(p):
                log.warning("killing leftover child %d of %s", p, name)
                _signal(p, signal.SIGKILL)
        self._known_children[name] = pids
        self._record()
        log.info("stopped %s (pid %d, exit %s)", name, m.pid, m.popen.returncode)
        return m.popen.returncode

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything it spawned at once, as a crash would (no cleanup)."""
        m = self.procs[name]
        pids = set(self._known_children.get(name, set()))
        if m.alive():
            pids.update(descendants(m.pid))
            _signal(m.pid, signal.SIGKILL)
        for p in pids:
            _signal(p, signal.SIGKILL)
        m.popen.wait(timeout=10)
        self._known_children[name] = pids
        self._record()
        log.info("killed %s (pid %d) and %d children", name, m.pid, len(pids))

    def stop_all(self) -> None:
        """Stop every process, newest first; never raises for a process already gone."""
        for name in reversed(list(self.procs)):
            try:
                self.stop(name)
            except Exception:  # noqa: BLE001 - keep stopping the others, then re-raise none
                log.exception("failed to stop %s (pid %d)", name, self.procs[name].pid)

    def leftovers(self) -> list[int]:
        """PIDs started here (or spawned by them) that are still running: should be empty."""
        pids: set[int] = set()
        for name, m in self.procs.items():
            pids.add(m.pid)
            pids.update(self._known_children.get(name, set()))
        return sorted(p for p in pids if not _is_zombie_or_gone(p))
