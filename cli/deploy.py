"""Deployment commands: ``fedmeta provision``, ``coordinator``, ``site``, ``run``, ``deploy local``.

* ``fedmeta provision --consortium consortium.yaml --out DIR`` creates the CA, the coordinator's
  certificate and one bundle per hospital; ``--add-site NAME`` issues one more bundle later and
  ``--revoke NAME`` withdraws one, without touching the others.
* ``fedmeta coordinator start --deployment DIR --state STATE`` runs the SuperLink (TLS, node
  authentication, state database) in the foreground and registers the active sites' keys;
  ``fedmeta coordinator revoke`` unregisters a site from the running SuperLink.
* ``fedmeta site start --node node.yaml`` runs a hospital's SuperNode in the foreground.
* ``fedmeta run --config exp.yaml --state STATE`` submits the experiment and streams its logs.
* ``fedmeta deploy local --sites 3 --rounds 2 --out DIR`` does all of it on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from fedmeta.common.errors import ProvisionError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the deployment subcommands."""
    p = sub.add_parser("provision", help="create or change a consortium's certificates and keys")
    p.add_argument("--consortium", type=Path, help="consortium.yaml (needed to create or add)")
    p.add_argument("--out", type=Path, required=True, help="provisioning folder")
    p.add_argument("--add-site", metavar="NAME", help="issue the bundle of one new site")
    p.add_argument("--revoke", metavar="NAME", help="revoke one site's key")
    p.add_argument("--reason", default="revoked by operator", help="why (kept in the registry)")
    p.set_defaults(func=_provision)

    co = sub.add_parser("coordinator", help="run the coordinator (Flower SuperLink)")
    co_sub = co.add_subparsers(dest="coordinator_command", required=True, metavar="ACTION")
    s = co_sub.add_parser("start", help="start the SuperLink and register the sites")
    _coordinator_args(s)
    s.add_argument("--fleet-address", default=None,
                   help="bind address of the gRPC Fleet API (default 0.0.0.0:<fleet_port>)")
    s.add_argument("--control-host", default="127.0.0.1",
                   help="bind host of the HTTPS Control API (default 127.0.0.1: operators only)")
    s.add_argument("--insecure", action="store_true", help="no TLS, no node authentication")
    s.set_defaults(func=_coordinator_start)
    r = co_sub.add_parser("revoke", help="revoke a site and unregister it from the SuperLink")
    _coordinator_args(r)
    r.add_argument("--site", required=True, help="site name")
    r.add_argument("--reason", default="revoked by operator")
    r.set_defaults(func=_coordinator_revoke)
    n = co_sub.add_parser("nodes", help="list the SuperNodes the SuperLink knows")
    _coordinator_args(n)
    n.set_defaults(func=_coordinator_nodes)

    st = sub.add_parser("site", help="run a hospital's SuperNode")
    st_sub = st.add_subparsers(dest="site_command", required=True, metavar="ACTION")
    ss = st_sub.add_parser("start", help="start the SuperNode of a site bundle's node.yaml")
    ss.add_argument("--node", type=Path, required=True, help="node.yaml from the site bundle")
    ss.add_argument("--insecure", action="store_true", help="no TLS (test machines only)")
    ss.add_argument("--run-dir", type=Path, default=None,
                    help="where process logs and pids.json go (default: beside node.yaml)")
    ss.set_defaults(func=_site_start)

    rn = sub.add_parser("run", help="submit an experiment to the running coordinator")
    _coordinator_args(rn)
    rn.add_argument("--config", type=Path, default=None, help="experiment YAML")
    rn.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    rn.add_argument("--out", type=Path, default=Path("runs/deploy"),
                    help="folder the coordinator writes summary.json into")
    rn.add_argument("--app", type=Path, default=None, help="fedmeta source folder (Flower app)")
    rn.add_argument("--no-stream", action="store_true", help="do not stream the run's logs")
    rn.add_argument("--secagg", action="store_true",
                    help="Reptile with SecAgg+ secure aggregation (server sees only the mean delta)")
    rn.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run")
    rn.set_defaults(func=_run)

    dp = sub.add_parser("deploy", help="whole deployments")
    dp_sub = dp.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")
    lo = dp_sub.add_parser("local", help="provision + SuperLink + SuperNodes on 127.0.0.1 + run")
    lo.add_argument("--sites", type=int, default=3)
    lo.add_argument("--rounds", type=int, default=2)
    lo.add_argument("--out", type=Path, required=True)
    lo.add_argument("--config", type=Path, default=None, help="experiment YAML")
    lo.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    lo.add_argument("--insecure", action="store_true", help="no TLS (prints a warning)")
    lo.add_argument("--timeout", type=float, default=900.0)
    lo.add_argument("--secagg", action="store_true", help="secure aggregation (SecAgg+)")
    lo.set_defaults(func=_deploy_local)


def _coordinator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--deployment", type=Path, required=True,
                   help="provisioning folder (from `fedmeta provision`)")
    p.add_argument("--state", type=Path, required=True,
                   help="coordinator state folder (database, audit log, logs)")


def _warn_insecure() -> None:
    print("WARNING: --insecure: TLS is OFF and hospitals are not authenticated. "
          "Never use this across a network.", file=sys.stderr)


def _provision(args: argparse.Namespace) -> int:
    from fedmeta.deploy.consortium import load_consortium
    from fedmeta.deploy.provision import add_site, provision, revoke_site

    if args.revoke:
        rec = revoke_site(args.out, args.revoke, reason=args.reason)
        print(f"revoked {rec.name} (key {rec.fingerprint}); run `fedmeta coordinator revoke` "
              "to unregister it from a running coordinator")
        return 0
    if args.consortium is None:
        raise ProvisionError("--consortium FILE is required to provision or to --add-site")
    consortium = load_consortium(args.consortium)
    if args.add_site:
        bundle = add_site(consortium, args.out, args.add_site)
        print(f"issued bundle for {args.add_site}: {bundle}")
        return 0
    registry = provision(consortium, args.out)
    print(f"provisioned {consortium.name}: CA and coordinator certificate in {args.out}, "
          f"{len(registry.sites)} site bundles in {args.out / 'sites'}")
    return 0


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signum)


def _foreground(procs: object, names: list[str]) -> int:
    """Block until one of ``names`` exits or SIGTERM/SIGINT arrives; the caller stops all."""
    from fedmeta.deploy.processes import Processes

    assert isinstance(procs, Processes)
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        while True:
            for name in names:
                m = procs.procs[name]
                if not m.alive():
                    print(f"{name} exited with code {m.popen.returncode}; see {m.log_path}",
                          file=sys.stderr)
                    return 1
            procs.refresh_children()
            time.sleep(1.0)
    except (_Stop, KeyboardInterrupt):
        return 0


def _coordinator_settings(deployment: Path) -> dict[str, object]:
    path = deployment / "coordinator" / "coordinator.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise ProvisionError(f"{path}: cannot read coordinator settings: {e}") from e


def _coordinator_start(args: argparse.Namespace) -> int:
    from fedmeta.deploy.local import start_coordinator
    from fedmeta.deploy.processes import Processes

    if args.insecure:
        _warn_insecure()
    settings = _coordinator_settings(args.deployment)
    fleet = args.fleet_address or f"0.0.0.0:{settings['fleet_port']}"
    with Processes(args.state / "run") as procs:
        handle = start_coordinator(
            procs,
            deployment=args.deployment,
            state=args.state,
            fleet_address=fleet,
            control_host=args.control_host,
            control_port=int(str(settings["control_port"])),
            insecure=args.insecure,
        )
        print(f"coordinator up: Fleet API (gRPC, TLS) {handle.fleet_address}, "
              f"Control API {handle.control_address}, {len(handle.node_ids)} sites registered; "
              "Ctrl-C to stop")
        return _foreground(procs, ["superlink"])


def _coordinator_env(args: argparse.Namespace) -> dict[str, str]:
    from fedmeta.deploy.launch import CoordinatorLayout, base_env

    layout = CoordinatorLayout(deployment=args.deployment, state=args.state)
    if not (layout.flwr_home / "config.toml").is_file():
        raise ProvisionError(
            f"{layout.flwr_home / 'config.toml'}: missing; is `fedmeta coordinator start "
            f"--state {args.state}` running?"
        )
    return base_env(layout.flwr_home)


def _coordinator_revoke(args: argparse.Namespace) -> int:
    from fedmeta.deploy.launch import CoordinatorLayout, load_node_ids, unregister_site
    from fedmeta.deploy.provision import Registry, revoke_site
    from fedmeta.server.audit import open_log

    layout = CoordinatorLayout(deployment=args.deployment, state=args.state)
    record = Registry.load(args.deployment).sites.get(args.site)
    if record is None:
        raise ProvisionError(f"{args.deployment / 'registry.json'}: no site named {args.site!r}")
    if record.status == "active":
        revoke_site(args.deployment, args.site, reason=args.reason)
    if args.site in load_node_ids(layout):
        node_id = unregister_site(layout, _coordinator_env(args), args.site)
        open_log(layout.audit).record("node_unregistered", site=args.site, node_id=node_id,
                                      reason=args.reason)
        print(f"unregistered {args.site} (node {node_id})")
    else:
        print(f"{args.site} was not registered with this coordinator; marked revoked")
    return 0


def _coordinator_nodes(args: argparse.Namespace) -> int:
    from fedmeta.deploy.launch import list_nodes

    for node in list_nodes(_coordinator_env(args)):
        print(json.dumps(node))
    return 0


def _site_start(args: argparse.Namespace) -> int:
    from fedmeta.deploy.local import start_site
    from fedmeta.deploy.node import load_node_config
    from fedmeta.deploy.processes import Processes

    if args.insecure:
        _warn_insecure()
    site = load_node_config(args.node)
    with Processes(args.run_dir or args.node.parent / "run") as procs:
        m = start_site(procs, site, insecure=args.insecure)
        print(f"site {site.site}: SuperNode (pid {m.pid}) dialing {site.superlink} over gRPC+TLS; "
              f"log {m.log_path}; Ctrl-C to stop")
        return _foreground(procs, [m.name])


def _run(args: argparse.Namespace) -> int:
    from fedmeta.deploy.launch import project_root, stream_logs, submit_run, wait_run
    from fedmeta.server.audit import open_log

    env = _coordinator_env(args)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_config = {
        "config": str(args.config.resolve()) if args.config else "",
        "overrides": " ".join(args.override),
        "out": str(out),
    }
    run_id = submit_run(env, app=args.app or project_root(), run_config=run_config,
                        secagg=args.secagg)
    open_log(args.state / "audit.jsonl").record("run_submitted", run_id=run_id, sites=[])
    print(f"submitted run {run_id}; results in {out}")
    if not args.no_stream:
        stream_logs(env, run_id)
    status = wait_run(env, run_id, timeout=args.timeout)
    print(f"run {run_id}: {status}")
    return 0 if status == "finished:completed" else 1


def _deploy_local(args: argparse.Namespace) -> int:
    from fedmeta.deploy.local import deploy_local

    if args.insecure:
        _warn_insecure()
    res = deploy_local(
        sites=args.sites,
        rounds=args.rounds,
        out=args.out,
        config=args.config,
        overrides=args.override,
        insecure=args.insecure,
        run_timeout=args.timeout,
        secagg=args.secagg,
    )
    print(f"run {res.run_id} {res.status}: provision {res.provision_s:.1f} s, start "
          f"{res.startup_s:.1f} s, run {res.run_s:.1f} s, total {res.total_s:.1f} s; "
          f"summary {res.summary}")
    if res.leftovers:
        print(f"WARNING: processes still running: {res.leftovers}", file=sys.stderr)
        return 1
    return 0
