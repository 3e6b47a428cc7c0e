"""The site worker outlives its SuperNode: a restarted SuperNode refuses the token of a task an
earlier one handed out (HTTP 401), and Flower's own retry policy answers that by sending SIGINT
to its process, which at a site is ``fedmeta site start`` itself."""

from __future__ import annotations

import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import httpx
import pytest

from fedmeta.client import worker as W
from fedmeta.sitecore.policy import SitePolicy


class _Refusing(BaseHTTPRequestHandler):
    """A Runtime API that knows no task: every call is 401, as after a SuperNode restart."""

    calls = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        type(self).calls += 1
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def sigint_count():  # type: ignore[no-untyped-def]
    """How many SIGINTs reached this process while the test ran."""
    seen: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda *_: seen.append(1))
    yield seen
    signal.signal(signal.SIGINT, previous)


def test_a_task_whose_token_is_refused_is_dropped_and_the_worker_lives_on(sigint_count) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    audit: list[tuple[str, dict[str, object]]] = []
    settings = W.WorkerSettings(runtime_address=f"127.0.0.1:{server.server_address[1]}", secret=b"s" * 32,
                                node_config={}, policy=SitePolicy(), version="0")
    worker = W.SiteWorker(settings, audit=lambda event, **kw: audit.append((event, kw)))
    try:
        t0 = time.monotonic()
        worker.serve("a-token-from-the-previous-supernode")
        elapsed = time.monotonic() - t0
    finally:
        server.shutdown()
        server.server_close()
    time.sleep(0.2)  # a signal sent by another thread is handled on the main thread's next step
    assert sigint_count == []
    assert _Refusing.calls >= 2  # the task's input, then its status: each refused once, not retried
    assert elapsed < W.TASK_RETRY_S / 2
    assert worker.served == 0 and audit == []  # nothing computed, nothing released


def test_the_retry_policy_retries_an_unreachable_supernode_and_stops_at_a_refusal() -> None:
    tries = {"refused": 0, "down": 0, "once": 0}
    request = httpx.Request("POST", "http://127.0.0.1/x")

    def refused() -> None:
        tries["refused"] += 1
        raise httpx.HTTPStatusError("401", request=request, response=httpx.Response(401, request=request))

    def down() -> None:
        tries["down"] += 1
        if tries["down"] < 3:
            raise httpx.ConnectError("connection refused")

    def once() -> None:
        tries["once"] += 1
        raise httpx.ConnectError("connection refused")

    with pytest.raises(httpx.HTTPStatusError):
        W.retry_invoker(30.0).invoke(refused)
    W.retry_invoker(30.0).invoke(down)  # back on the third try
    with pytest.raises(httpx.ConnectError):
        W.retry_invoker(0).invoke(once)
    assert tries == {"refused": 1, "down": 3, "once": 1}


def test_a_heartbeat_for_a_task_the_supernode_forgot_never_signals(sigint_count) -> None:
    client = SimpleNamespace(SendTaskHeartbeat=lambda request: SimpleNamespace(success=False))
    beat = W.task_heartbeat(client)  # type: ignore[arg-type]
    assert beat() is True and beat() is True
    time.sleep(0.1)
    assert sigint_count == []
