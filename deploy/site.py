"""A hospital's side of a deployment: ``fedmeta site start --node node.yaml``.

Before anything starts, the site checks everything it can: the node file, its key (decrypted
with its own passphrase), the installed fedmeta against the hospital's pin (version and, when
pinned, the code's hash) and its data (loaded and validated). Then it runs two things until stopped:

- Flower's SuperNode (``python -m fedmeta.deploy.supernode``, gRPC with TLS to the coordinator,
  authenticated by the hospital's key, in ``process`` isolation: it launches nothing), restarted
  with growing waits whenever it exits (the coordinator unreachable, or refusing a node whose
  previous session has not expired yet), and
- the site worker (:class:`fedmeta.client.worker.SiteWorker`) in this process, the only code
  that computes for the federation, with the site's data loaded once.

The key reaches the SuperNode decrypted in memory (``/dev/fd/N``), as does the secret the
SuperNode and the worker share; the site's state folder is owner-only and its audit log records
starts, refusals and what was served.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedmeta.common.config import ExperimentConfig
from fedmeta.common.errors import ConfigError
from fedmeta.common.extras import installed_version
from fedmeta.deploy.launch import app_env
from fedmeta.deploy.node import NodeConfig
from fedmeta.deploy.processes import Managed, Processes
from fedmeta.deploy.secrets import MemoryFile, decrypted_pem, secure_folder
from fedmeta.deploy.supernode import POLL_ENV, WAKE_ENV
from fedmeta.protocol import flower_compat
from fedmeta.protocol.app import code_digest
from fedmeta.sitecore.audit import SiteAudit

log = logging.getLogger(__name__)

INSECURE_WARNING = (
    "--insecure: TLS is OFF. Model updates and credentials cross the network unencrypted and "
    "hospitals are not authenticated. Use only on a closed test machine."
)
BACKOFF_S = (2.0, 4.0, 8.0, 15.0, 30.0, 60.0)


@dataclass(frozen=True)
class SitePreflight:
    """What the checks before start found: the version and code digest that will run."""

    version: str
    code_sha256: str
    n_train: int
    n_test: int


def preflight(node: NodeConfig) -> SitePreflight:
    """Check the pin and the site's data before anything starts (errors name what is wrong)."""
    version = installed_version()
    digest = code_digest()
    if node.app is None:
        raise ConfigError(f"{node.source}: app: pins no fedmeta version; add app: {{version: "
                          f"{version}}} to accept runs of the fedmeta installed here")
    if node.app.version != version:
        raise ConfigError(f"{node.source}: app.version = {node.app.version!r}, but fedmeta "
                          f"{version} is installed; install the pinned version or change the pin")
    if node.app.code_sha256 is not None and node.app.code_sha256 != digest:
        raise ConfigError(f"{node.source}: app.code_sha256 does not match the installed fedmeta "
                          f"code ({digest[:16]}…): the installation changed since it was pinned; "
                          "re-pin with `fedmeta site pin --node` after checking it")
    from fedmeta.sitecore.data import site_for_node

    site = site_for_node(node.node_config(), ExperimentConfig())
    return SitePreflight(version=version, code_sha256=digest, n_train=site.n_train, n_test=site.n_test)


def supernode_argv(node: NodeConfig, *, key_path: str | None, secret_path: str, runtime_port: int,
                   insecure: bool = False, superlink: str | None = None,
                   use_ca: bool = True) -> list[str]:
    """``flower-supernode`` (with fedmeta's waits) for one hospital, in process isolation."""
    argv = [sys.executable, "-m", "fedmeta.deploy.supernode", "--grpc-rere",
            "--superlink", superlink or node.superlink]
    if insecure:
        log.warning(INSECURE_WARNING)
        argv += ["--insecure"]
    else:
        if use_ca:
            argv += ["--root-certificates", str(node.root_certificates)]
        if key_path is not None:
            argv += ["--auth-supernode-private-key", key_path]
    argv += ["--isolation", "process", "--superexec-auth-secret-file", secret_path,
             "--host", "127.0.0.1", "--port", str(runtime_port)]
    return argv


class SiteRunner:
    """The hospital's SuperNode (restarted with backoff) and its worker, until :meth:`stop`."""

    def __init__(self, node: NodeConfig, *, insecure: bool = False, runtime_port: int | None = None,
                 superlink: str | None = None, use_ca: bool = True, max_restarts: int | None = None,
                 say: object = None) -> None:
        self.node = node
        self.insecure = insecure
        self.runtime_port = runtime_port or node.runtime_port
        self.superlink = superlink
        self.use_ca = use_ca
        self.max_restarts = max_restarts
        self.say = say if callable(say) else (lambda text: log.info("%s", text))
        self.state = secure_folder(node.state_dir())
        self.audit = SiteAudit(self.state / "audit.jsonl")
        self.procs = Processes(self.state / "run")
        self._stop = threading.Event()
        self._key: MemoryFile | None = None
        self._secret: MemoryFile | None = None
        self.worker: object = None
        self._wake: tuple[int, int] | None = None  # the SuperNode -> worker wake-up pipe (read, write)
        self.node_process: Managed | None = None
        self.restarts = 0
        self.refusals = 0

    def start(self) -> SitePreflight:
        """Check everything, then start the SuperNode and the worker; returns the checks' result."""
        from fedmeta.client.worker import IDLE_POLL_S, SiteWorker, WorkerSettings

        if not self.insecure:  # the key first: a missing or wrong passphrase stops here, at once
            self._key = decrypted_pem(self.node.auth_private_key, self.node.passphrase(), openssh=True,
                                      what=self.node.key_name())
        checked = preflight(self.node)
        secret = secrets.token_bytes(32)
        self._secret = MemoryFile("superexec-secret", secret)
        self._wake = os.pipe()
        self.audit.record("site_started", site=self.node.site, version=checked.version,
                          code_sha256=checked.code_sha256,
                          policy_min_patients=self.node.policy.min_patients)
        self._start_node()
        self._write_status("started", "the node was started", 0)
        worker = SiteWorker(
            WorkerSettings(runtime_address=f"127.0.0.1:{self.runtime_port}", secret=secret,
                           node_config=self.node.node_config(), policy=self.node.policy,
                           version=checked.version, poll_s=min(IDLE_POLL_S, self.node.poll_interval_s),
                           ledger_path=self.state / "ledger.json", wake_fd=self._wake[0]),
            audit=self.audit.record,
        )
        self.worker = worker
        threading.Thread(target=worker.run, name="fedmeta-site-worker", daemon=True).start()
        return checked

    def _start_node(self) -> None:
        assert self._secret is not None
        argv = supernode_argv(self.node, key_path=self._key.path if self._key else None,
                              secret_path=self._secret.path, runtime_port=self.runtime_port,
                              insecure=self.insecure, superlink=self.superlink, use_ca=self.use_ca)
        env = app_env(self.state / "flwr-home", passphrase_env=self.node.key_passphrase_env)
        env[POLL_ENV] = str(self.node.poll_interval_s)
        fds = [self._secret.fd] + ([self._key.fd] if self._key else [])
        if self._wake is not None:  # the node wakes the worker when a message arrives
            env[WAKE_ENV] = str(self._wake[1])
            fds.append(self._wake[1])
        self.node_process = self.procs.start("supernode", argv, env=env, pass_fds=fds)

    def _write_status(self, status: str, reason: str, wait: float) -> None:
        """``STATE/status.json`` for operators and health checks: ``started``, ``retrying`` or
        ``refused`` (the coordinator turned the node away), why, and when (owner-only)."""
        import json

        doc = {"status": status, "reason": reason, "restarts": self.restarts, "retry_in_s": wait,
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        path = self.state / "status.json"
        tmp = path.with_name("status.json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        tmp.replace(path)

    def _answering(self) -> bool:
        """Whether the SuperNode's own Runtime API (served by the SuperNode process, on
        127.0.0.1) accepts a connection: a running SuperNode always serves it."""
        try:
            with socket.create_connection(("127.0.0.1", self.runtime_port), timeout=1.0):
                return True
        except OSError:
            return False

    def supervise(self) -> int:
        """Block until stopped; restart the SuperNode with growing waits whenever it exits, or
        when it is alive but does not serve its Runtime API (both checked every :data:`CHECK_S`):
        closed for :data:`CLOSED_S` after it had opened it (a SuperNode that gave up reconnecting can hang in its own shutdown:
        Flower 1.39 raises inside its exit handler and a thread keeps the process alive), or
        never opened :data:`STARTUP_S` after its start. Returns 0 when stopped, 1 when
        ``max_restarts`` was exhausted."""
        started, last_answer = time.monotonic(), None
        while not self._stop.is_set():
            assert self.node_process is not None
            hung = False
            if self.node_process.alive():
                now = time.monotonic()
                if self._answering():
                    last_answer = now
                elif (now - last_answer > CLOSED_S) if last_answer is not None else (now - started > STARTUP_S):
                    hung = True
                    self.procs.kill("supernode")
                if not hung:
                    self._stop.wait(CHECK_S)
                    continue
            code = self.node_process.popen.returncode
            why = UNRESPONSIVE if hung else _exit_reason(self.node_process.log_path)
            if self.max_restarts is not None and self.restarts >= self.max_restarts:
                self.say(f"site {self.node.site}: the node exited ({why}); giving up after "
                         f"{self.restarts} restarts")
                return 1
            wait = BACKOFF_S[min(self.restarts, len(BACKOFF_S) - 1)]
            self.restarts += 1
            self.refusals = self.refusals + 1 if why == REFUSED else 0
            self.audit.record("node_restarted", attempt=self.restarts, wait_s=wait, reason=why[:200])
            self.say(f"site {self.node.site}: the node exited with code {code} ({why}); "
                     f"retrying in {wait:.0f} s (attempt {self.restarts})")
            if self.refusals >= 3:  # a session expires within ~20 s: by now the key is the problem
                self.say(f"site {self.node.site}: refused {self.refusals} times in a row: its key is "
                         "most likely not registered or was revoked; ask the consortium operator "
                         "(fedmeta coordinator nodes lists the registered keys)")
            self._write_status("refused" if self.refusals else "retrying", why, wait)
            if self._stop.wait(wait):
                break
            self._start_node()
            started, last_answer = time.monotonic(), None
        return 0

    def stop(self) -> None:
        """Stop the worker and the SuperNode (by PID) and release the in-memory secrets."""
        self._stop.set()
        stop = getattr(self.worker, "stop", None)
        if callable(stop):
            stop()
        if self._wake is not None:
            with contextlib.suppress(OSError):  # a full pipe wakes the worker as well
                os.write(self._wake[1], b"!")  # the worker's wait returns and sees it is stopped
        self.procs.stop_all()
        for mem in (self._key, self._secret):
            if mem is not None:
                mem.close()
        if self._wake is not None:
            os.close(self._wake[1])  # the worker closes the read end when its loop ends
            self._wake = None
        self.audit.record("site_stopped", site=self.node.site,
                          served=int(getattr(self.worker, "served", 0)),
                          refused=int(getattr(self.worker, "refused", 0)))


#: Seconds between two checks of the SuperNode (is it alive, does it serve its Runtime API): each
#: check connects to that API, which the SuperNode answers, so an idle site pays for each.
CHECK_S = 2.0
#: Seconds a live SuperNode may keep its Runtime API closed before it is killed and restarted:
#: after it had opened it (it is shutting down, which takes a second), and after its start (it
#: opens it within seconds; a busy machine gets plenty of slack).
CLOSED_S, STARTUP_S = 5.0, 60.0
UNRESPONSIVE = "the node was alive but not serving its Runtime API (hung) and was killed"

REFUSED = flower_compat.NODE_REFUSED


def _exit_reason(log_path: Path) -> str:
    """A short reason from the end of the SuperNode's log (never data: Flower's own lines)."""
    try:
        tail = log_path.read_text(errors="replace")[-4000:]
    except OSError:
        return "no log"
    for marker, text in flower_compat.SUPERNODE_EXIT_MARKERS:
        if marker in tail:
            return text
    return "see " + str(log_path)


def run_site(node: NodeConfig, *, insecure: bool = False, say: object = None) -> int:
    """``fedmeta site start``: start, supervise until SIGTERM/Ctrl-C, stop."""
    import signal

    runner = SiteRunner(node, insecure=insecure, say=say)
    previous = signal.signal(signal.SIGTERM, lambda *_: runner._stop.set())
    try:
        checked = runner.start()
        runner.say(f"site {node.site}: fedmeta {checked.version} (code {checked.code_sha256[:12]}), "
                   f"{checked.n_train} training / {checked.n_test} test patients; node dialing "
                   f"{node.superlink} over gRPC+TLS; state in {runner.state}; Ctrl-C to stop")
        return runner.supervise()
    except KeyboardInterrupt:
        return 0
    finally:
        runner.stop()
        signal.signal(signal.SIGTERM, previous)


def umask_owner_only() -> None:
    """Files this process creates from now on are readable by their owner only."""
    os.umask(0o077)


__all__ = ["SiteRunner", "preflight", "run_site", "supernode_argv", "umask_owner_only"]
_ = time  # the module's waits use threading events; time is kept for callers' monkeypatching
