"""Another local user on the coordinator host (tests only; run as uid ``nobody``).

With the SuperLink's Control API at ``--tcp HOST:PORT`` (Flower's default arrangement) or at
``--socket PATH`` (fedmeta's), it tries what the attacker of the security report did: list the
nodes, register a key of its own (as ``flwr supernode register`` does) and start a run of its
own app (as ``flwr run`` does). It prints one JSON object: for each step, what came back or the
error's type and text.

It imports nothing of fedmeta: it is what an attacker writes.
"""

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.build import build_fab_from_disk
from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.proto.control_pb2 import (  # pylint: disable=E0611
    ListNodesRequest,
    RegisterNodeRequest,
    StartRunRequest,
)
from flwr.supercore.control.control_http_client import ControlHttpClient
from flwr.supercore.fab import Fab
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

APP = (
    "from flwr.serverapp import ServerApp\n"
    "app = ServerApp()\n"
    "@app.main()\n"
    "def main(grid, context):\n"
    "    pass\n"
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tcp", default=None)
    p.add_argument("--socket", default=None)
    args = p.parse_args()
    interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr CLI")]
    if args.tcp:
        client = ControlHttpClient(f"https://{args.tcp}", interceptors=interceptors, verify=False)
    else:
        client = ControlHttpClient("http://superlink", interceptors=interceptors)
        client._client = httpx.Client(transport=httpx.HTTPTransport(uds=args.socket), timeout=10)
    out: dict[str, object] = {}

    def attempt(step: str, fn) -> None:  # type: ignore[no-untyped-def]
        try:
            out[step] = {"ok": fn()}
        except Exception as e:  # noqa: BLE001 - reported
            out[step] = {"error": type(e).__name__, "text": str(e)[:200]}

    attempt("list_nodes", lambda: len(client.ListNodes(ListNodesRequest()).nodes_info))
    key = public_key_to_bytes(ec.generate_private_key(ec.SECP384R1()).public_key())
    attempt("register_node", lambda: int(client.RegisterNode(RegisterNodeRequest(public_key=key, name="x")).node_id))
    with tempfile.TemporaryDirectory() as tmp:
        app = Path(tmp) / "app"
        app.mkdir()
        (app / "own_app.py").write_text(APP)
        (app / "pyproject.toml").write_text(
            '[project]\nname = "own"\nversion = "1.0.0"\n\n[tool.flwr.app]\npublisher = "someone"\n\n'
            '[tool.flwr.app.components]\nserverapp = "own_app:app"\nclientapp = "own_app:app"\n')

        def start() -> int:
            fab = build_fab_from_disk(app)
            req = StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
                                  override_config=user_config_to_proto({}), federation="")
            return int(client.StartRun(req).run_id)

        attempt("start_run", start)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
