"""``python -m fedmeta.deploy.superlink --control-socket PATH ARGS``: Flower's ``flower-superlink``
with its HTTP API (the Control API and the Runtime API, which Flower 1.39 serves together from
one uvicorn server) on a Unix socket instead of a TCP port.

Flower 1.39's Control API has no user authentication in the open-source build (its only plugin
besides the no-op one is the enterprise OIDC plugin), and its HTTP API listens on ``--host`` and
``--port``: on 127.0.0.1 any local user could register a node, start a run or list the nodes.
This entry point runs the same SuperLink (``_parse_superlink_lifespan_config``, ``create_app``,
the same lifespan that starts the gRPC Fleet API with TLS) but hands uvicorn a Unix socket bound
here with mode 0600 inside the coordinator's owner-only state folder: only the coordinator's own
user (and root) can connect. The socket carries no TLS (no network is involved; the folder and
the socket's mode are the access control). Flower's optional gRPC Control API
(``$FLWR_INTERNAL_GRPC_CONTROL_API``) is switched off, and only ``--isolation process`` is
accepted: the SuperLink launches nothing, fedmeta's own executor
(:mod:`fedmeta.deploy.serverexec`) runs the ServerApp.

The Flower functions used are reached through :mod:`fedmeta.protocol.flower_compat`, whose
check names any an upgrade moves (and a test fails).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

#: The longest path a Unix socket may have (``sun_path`` is 108 bytes on Linux, with its NUL).
MAX_SOCKET_PATH = 107
#: How often the API's HTTP server wakes when nothing happens (uvicorn: every 0.1 s).
HTTP_TICK_S = 1.0


def patch_points_present() -> bool:
    """Whether the pinned Flower still has what this module calls
    (:func:`fedmeta.protocol.flower_compat.superlink_problems` names anything that moved)."""
    from fedmeta.protocol import flower_compat

    return not flower_compat.superlink_problems()


def check_socket_path(path: Path) -> None:
    """A Unix socket path must fit ``sun_path``; the error names the path."""
    from fedmeta.common.errors import ProvisionError

    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        raise ProvisionError(f"{path}: the Control API socket's path is longer than {MAX_SOCKET_PATH} "
                             "bytes (a Unix socket's limit); use a shorter --state folder")


def bind(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` (a stale socket there is replaced), mode 0600."""
    if path.is_socket():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def main() -> None:
    argv = sys.argv[1:]
    if "--control-socket" not in argv or argv.index("--control-socket") + 1 >= len(argv):
        sys.exit("fedmeta.deploy.superlink: --control-socket PATH is required")
    i = argv.index("--control-socket")
    path = Path(argv[i + 1])
    rest = argv[:i] + argv[i + 2:]
    if "--isolation" not in rest or rest[rest.index("--isolation") + 1:][:1] != ["process"]:
        sys.exit("fedmeta.deploy.superlink: only --isolation process is supported "
                 "(fedmeta's own executor runs the ServerApp)")
    os.environ.pop("FLWR_INTERNAL_GRPC_CONTROL_API", None)
    if not patch_points_present():
        sys.exit("this Flower version no longer has the SuperLink entry points fedmeta calls; "
                 "pin flwr 1.39.0 or update fedmeta.deploy.superlink")
    import uvicorn

    from fedmeta.protocol.flower_compat import (
        console_handler,
        create_app,
        get_uvicorn_log_config,
        slow_http_ticks,
        superlink_cli,
    )

    slow_http_ticks(HTTP_TICK_S)  # an idle coordinator: one wake-up a second, not ten

    cli = superlink_cli()

    sys.argv = ["flower-superlink", *rest]
    config = cli._parse_superlink_lifespan_config()
    sock = bind(path)
    print(f"fedmeta: SuperLink Control and Runtime API on unix socket {path}", flush=True)
    app = create_app(config, cli.SuperLinkLifespan)
    uvicorn.run(app=app, fd=sock.fileno(), reload=False, access_log=True,
                log_config=get_uvicorn_log_config(console_handler.level), workers=1)


if __name__ == "__main__":
    main()
