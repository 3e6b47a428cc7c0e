"""Deployment commands: ``fedmeta provision``, ``coordinator``, ``site``, ``run``, ``deploy local``.

* ``fedmeta provision --consortium consortium.yaml --out DIR`` creates the CA (its key
  encrypted with its own passphrase, ``--ca-passphrase-file``), the coordinator's certificate
  (its key with another, ``--passphrase-file``) and a bundle for each hospital that sent its
  public key (``fedmeta site keygen``); ``--add-site NAME --public-key FILE`` issues one more
  bundle later and ``--revoke NAME`` withdraws one, without touching the others (both need only
  the CA key). ``--site-keys`` makes the hospitals' key pairs here instead, each with its own
  random passphrase in ``DIR/passphrases/NAME.pass``.
* ``fedmeta coordinator start --deployment DIR --state STATE`` runs the SuperLink (TLS, node
  authentication, state database) in the foreground and reconciles its registrations with the
  consortium registry; ``fedmeta coordinator revoke`` unregisters a site from the running one.
* ``fedmeta site start --node node.yaml`` runs a hospital's node and worker in the foreground;
  ``site keygen`` makes a hospital's own key pair; ``site pin`` pins the installed code.
* ``fedmeta run --config exp.yaml --state STATE`` validates the experiment, submits it, shows its
  progress and copies its outputs to ``--out``.
* ``fedmeta deploy local --sites 3 --rounds 2 --out DIR`` does all of it on 127.0.0.1.

Every command checks its inputs before it starts or submits anything, and imports Flower, torch
and the rest only when it runs.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from fedmeta.common.errors import ConfigError, ProvisionError

if TYPE_CHECKING:
    from fedmeta.deploy.secrets import KeyRole, Passphrase


def _passphrase_args(p: argparse.ArgumentParser, *, key: str = "the key") -> argparse._ArgumentGroup:
    g = p.add_argument_group("private keys (encrypted at rest, each with its own passphrase)")
    g.add_argument("--passphrase-file", type=Path, default=None,
                   help=f"file whose first line is {key}'s passphrase (mode 0600)")
    g.add_argument("--passphrase-env", default=None, metavar="NAME",
                   help=f"environment variable holding {key}'s passphrase (default FEDMETA_KEY_PASSPHRASE)")
    g.add_argument("--plaintext-keys", action="store_true",
                   help="write/read private keys unencrypted (test machines only)")
    return g


def _passphrase(args: argparse.Namespace, role: KeyRole | None = None) -> Passphrase:
    from fedmeta.deploy.secrets import HOST_KEY, Passphrase

    return Passphrase.from_options(file=args.passphrase_file, env=args.passphrase_env,
                                   plaintext=args.plaintext_keys, role=role or HOST_KEY)


def _ca_passphrase(args: argparse.Namespace) -> Passphrase:
    from fedmeta.deploy.secrets import CA_KEY, Passphrase

    return Passphrase.from_options(file=args.ca_passphrase_file, env=args.ca_passphrase_env,
                                   plaintext=args.plaintext_keys, role=CA_KEY)


def _set_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override experiment settings; values are YAML, e.g. "
                        "--set rounds=5 'data.holdout=[\"VA Long Beach\"]'")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the deployment subcommands."""
    p = sub.add_parser("provision", help="create or change a consortium's certificates and keys")
    p.add_argument("--consortium", type=Path, help="consortium.yaml (needed to create or add)")
    p.add_argument("--out", type=Path, required=True, help="provisioning folder")
    p.add_argument("--add-site", metavar="NAME", help="issue the bundle of one new site")
    p.add_argument("--public-key", type=Path, default=None,
                   help="with --add-site: the hospital's own supernode.pub (its private key stays there)")
    p.add_argument("--site-keys", action="store_true",
                   help="make the hospitals' key pairs here instead of taking their public keys, each "
                        "encrypted with its own random passphrase (OUT/passphrases/NAME.pass, 0600) to "
                        "hand over apart from the bundle")
    p.add_argument("--revoke", metavar="NAME", help="revoke one site's key")
    p.add_argument("--reason", default="revoked by operator", help="why (kept in the registry)")
    g = _passphrase_args(p, key="the coordinator key")
    g.add_argument("--ca-passphrase-file", type=Path, default=None,
                   help="file whose first line is the CA key's own passphrase (mode 0600)")
    g.add_argument("--ca-passphrase-env", default=None, metavar="NAME",
                   help="environment variable holding the CA key's passphrase (default FEDMETA_CA_PASSPHRASE)")
    p.set_defaults(func=_provision)

    co = sub.add_parser("coordinator", help="run the coordinator (Flower SuperLink)")
    co_sub = co.add_subparsers(dest="coordinator_command", required=True, metavar="ACTION")
    s = co_sub.add_parser("start", help="start the SuperLink and reconcile the registered sites")
    _coordinator_args(s)
    s.add_argument("--fleet-address", default=None,
                   help="bind address of the gRPC Fleet API (default <coordinator host>:<fleet_port> "
                        "from provisioning; 0.0.0.0:PORT binds every interface)")
    s.add_argument("--insecure", action="store_true", help="no TLS, no node authentication")
    s.add_argument("--persist-state", action="store_true",
                   help="keep the SuperLink's state in <state>/superlink.db (SQLite) instead of memory: "
                        "Flower's run history survives a restart; rounds are about 3x slower")
    _passphrase_args(s, key="the coordinator key (coordinator/server.key)")
    s.set_defaults(func=_coordinator_start)
    r = co_sub.add_parser("revoke", help="revoke a site and unregister it from the SuperLink")
    _coordinator_args(r)
    r.add_argument("--site", required=True, help="site name")
    r.add_argument("--reason", default="revoked by operator")
    r.set_defaults(func=_coordinator_revoke)
    n = co_sub.add_parser("nodes", help="list the SuperNodes the SuperLink knows")
    _coordinator_args(n)
    n.set_defaults(func=_coordinator_nodes)

    st = sub.add_parser("site", help="a hospital's node: start it, make its key, pin its code")
    st_sub = st.add_subparsers(dest="site_command", required=True, metavar="ACTION")
    ss = st_sub.add_parser("start", help="start the node and worker of a bundle's node.yaml")
    ss.add_argument("--node", type=Path, required=True, help="node.yaml from the site bundle")
    ss.add_argument("--state", type=Path, default=None,
                    help="writable folder for logs and the audit log (instead of node.yaml's state:)")
    ss.add_argument("--passphrase-file", type=Path, default=None,
                    help="the key's passphrase file (instead of node.yaml's key_passphrase_*)")
    ss.add_argument("--insecure", action="store_true", help="no TLS (test machines only)")
    ss.set_defaults(func=_site_start)
    kg = st_sub.add_parser("keygen", help="make this hospital's own key pair (send only the .pub)")
    kg.add_argument("--out", type=Path, required=True, help="folder for supernode.key and supernode.pub")
    kg.add_argument("--name", default="site", help="a comment naming the key")
    _passphrase_args(kg, key="the site key")
    kg.set_defaults(func=_site_keygen)
    pn = st_sub.add_parser("pin", help="record the installed fedmeta code's hash in node.yaml")
    pn.add_argument("--node", type=Path, required=True, help="node.yaml to update")
    pn.set_defaults(func=_site_pin)

    rn = sub.add_parser("run", help="submit an experiment to the running coordinator")
    _coordinator_args(rn)
    rn.add_argument("--config", type=Path, default=None,
                    help="experiment YAML, or a bundled experiment's name (e.g. heart-maml)")
    _set_arg(rn)
    rn.add_argument("--name", default=None, help="run folder name under STATE/runs (default <algorithm>-<time>)")
    rn.add_argument("--resume", default=None, metavar="NAME",
                    help="continue the stopped run NAME from its checkpoint (--set rounds=N extends it)")
    rn.add_argument("--out", type=Path, default=None, help="also copy the run's outputs here")
    rn.add_argument("--no-stream", action="store_true", help="do not show the run's progress")
    rn.add_argument("--secagg", action="store_true",
                    help="Reptile with SecAgg+ secure aggregation (server sees only the mean delta)")
    rn.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds to wait; the run is stopped after that")
    rn.set_defaults(func=_run)

    dp = sub.add_parser("deploy", help="whole deployments")
    dp_sub = dp.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")
    lo = dp_sub.add_parser("local", help="provision + SuperLink + sites on 127.0.0.1 + run")
    lo.add_argument("--sites", type=int, default=3)
    lo.add_argument("--rounds", type=int, default=None,
                    help="rounds (default: the experiment's, or 2 with the default experiment)")
    lo.add_argument("--out", type=Path, required=True)
    lo.add_argument("--config", type=Path, default=None, help="experiment YAML or bundled name")
    _set_arg(lo)
    lo.add_argument("--insecure", action="store_true", help="no TLS (prints a warning)")
    lo.add_argument("--timeout", type=float, default=900.0)
    lo.add_argument("--secagg", action="store_true", help="secure aggregation (SecAgg+)")
    lo.add_argument("--no-stream", action="store_true", help="do not show the run's progress")
    lo.set_defaults(func=_deploy_local)


def _coordinator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--deployment", type=Path, required=True,
                   help="provisioning folder (from `fedmeta provision`)")
    p.add_argument("--state", type=Path, required=True,
                   help="coordinator state folder (database, audit log, runs, logs)")


def _warn_insecure() -> None:
    print("WARNING: --insecure: TLS is OFF and hospitals are not authenticated. "
          "Never use this across a network.", file=sys.stderr)


def _provision(args: argparse.Namespace) -> int:
    from fedmeta.deploy.consortium import load_consortium
    from fedmeta.deploy.provision import (
        PASSPHRASES,
        add_site,
        pending_sites,
        provision,
        revoke_site,
    )
    from fedmeta.deploy.sitekeys import fingerprint

    if (args.revoke or args.add_site) and (args.passphrase_file or args.passphrase_env):
        raise ProvisionError("--add-site and --revoke use the CA key only: give its passphrase with "
                             "--ca-passphrase-file or $FEDMETA_CA_PASSPHRASE, not the coordinator key's")
    if args.revoke:
        rec = revoke_site(args.out, args.revoke, reason=args.reason, ca_passphrase=_ca_passphrase(args))
        print(f"revoked {rec.name} (key {rec.fingerprint}); a coordinator started from now on "
              "unregisters it; `fedmeta coordinator revoke` tells a running one")
        return 0
    if args.consortium is None:
        raise ProvisionError("--consortium FILE is required to provision or to --add-site")
    consortium = load_consortium(args.consortium)
    ca_passphrase = _ca_passphrase(args)
    if args.add_site:
        bundle = add_site(consortium, args.out, args.add_site, ca_passphrase=ca_passphrase,
                          public_key=args.public_key, site_keys=args.site_keys)
        made = args.site_keys and not ca_passphrase.none
        fp = (bundle / "supernode.pub").read_bytes()
        print(f"issued bundle for {args.add_site} (key {fingerprint(fp)}): {bundle}" + (
            f"; its key's passphrase is in {args.out / PASSPHRASES / (args.add_site + '.pass')}: hand it "
            "over apart from the bundle, then delete it" if made else ""))
        return 0
    if args.public_key is not None:
        raise ProvisionError("--public-key goes with --add-site NAME (or public_key: in the consortium file)")
    from fedmeta.deploy.secrets import COORDINATOR_KEY

    passphrase = _passphrase(args, COORDINATOR_KEY)
    registry = provision(consortium, args.out, ca_passphrase=ca_passphrase, passphrase=passphrase,
                         site_keys=args.site_keys)
    print(f"provisioned {consortium.name}: CA (key: {ca_passphrase.describe()}) and coordinator "
          f"certificate (key: {passphrase.describe()}) in {args.out}, {len(registry.sites)} site "
          f"bundles in {args.out / 'sites'}")
    if args.site_keys and not passphrase.none:
        print(f"each site key has its own passphrase in {args.out / PASSPHRASES}/NAME.pass (0600): hand it "
              "over apart from the bundle, then delete it")
    pending = pending_sites(consortium, registry)
    if pending:
        print(f"{len(pending)} sites await their public key: {', '.join(pending)}; each runs `fedmeta site "
              "keygen` and sends supernode.pub, then `fedmeta provision --add-site NAME --public-key FILE`")
    return 0


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signum)


def _coordinator_settings(deployment: Path) -> dict[str, object]:
    path = deployment / "coordinator" / "coordinator.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise ProvisionError(f"{path}: cannot read coordinator settings: {e}") from e


def _coordinator_start(args: argparse.Namespace) -> int:
    from fedmeta.deploy.coordinator import start_coordinator
    from fedmeta.deploy.processes import Processes
    from fedmeta.deploy.secrets import COORDINATOR_KEY, Passphrase

    if args.insecure:
        _warn_insecure()
    settings = _coordinator_settings(args.deployment)
    fleet = args.fleet_address or f"{settings['host']}:{settings['fleet_port']}"
    passphrase = Passphrase(none=True) if args.insecure else _passphrase(args, COORDINATOR_KEY)
    with Processes(args.state / "run") as procs:
        handle = start_coordinator(
            procs, deployment=args.deployment, state=args.state, passphrase=passphrase,
            fleet_address=fleet, insecure=args.insecure, persist_state=args.persist_state,
        )
        print(f"coordinator up: Fleet API (gRPC, TLS) {handle.fleet_address}, "
              f"Control API on {handle.control_address} (this user only), {len(handle.node_ids)} sites registered "
              f"({', '.join(sorted(handle.node_ids))}); runs in {handle.layout.runs}; Ctrl-C to stop")
        signal.signal(signal.SIGTERM, _raise_stop)
        try:
            while handle.alive():
                procs.refresh_children()
                time.sleep(1.0)
            gone = handle.process if not handle.process.alive() else handle.executor
            print(f"{gone.name} exited with code {gone.popen.poll()}; see {gone.log_path}",
                  file=sys.stderr)
            return 1
        except (_Stop, KeyboardInterrupt):
            return 0


def _coordinator_env(args: argparse.Namespace) -> dict[str, str]:
    from fedmeta.deploy.coordinator import coordinator_env
    from fedmeta.deploy.launch import CoordinatorLayout

    layout = CoordinatorLayout(deployment=args.deployment, state=args.state)
    if not layout.socket.is_socket():
        raise ProvisionError(
            f"{layout.socket}: no Control API socket; is `fedmeta coordinator start "
            f"--state {args.state}` running (as this user)?"
        )
    return coordinator_env(layout)


def _coordinator_revoke(args: argparse.Namespace) -> int:
    from fedmeta.deploy.coordinator import load_node_ids, unregister_site
    from fedmeta.deploy.launch import CoordinatorLayout
    from fedmeta.deploy.provision import Registry, record_revocation
    from fedmeta.server.audit import open_log

    layout = CoordinatorLayout(deployment=args.deployment, state=args.state)
    record = Registry.load(args.deployment).sites.get(args.site)
    if record is None:
        raise ProvisionError(f"{args.deployment / 'registry.json'}: no site named {args.site!r}")
    if record.status == "active":
        record_revocation(args.deployment, args.site, reason=args.reason)
    if args.site in load_node_ids(layout):
        from fedmeta.deploy.control import Control

        _coordinator_env(args)
        with Control(layout.socket) as control:
            node_id = unregister_site(layout, control, args.site)
        open_log(layout.audit).record("node_unregistered", site=args.site, node_id=node_id,
                                      reason=args.reason, fingerprint=record.fingerprint)
        print(f"unregistered {args.site} (node {node_id})")
    else:
        print(f"{args.site} was not registered with this coordinator; marked revoked")
    return 0


def _coordinator_nodes(args: argparse.Namespace) -> int:
    from fedmeta.deploy.control import Control
    from fedmeta.deploy.launch import CoordinatorLayout
    from fedmeta.deploy.sitekeys import fingerprint_of_bytes

    _coordinator_env(args)
    with Control(CoordinatorLayout(args.deployment, args.state).socket) as control:
        for node in control.nodes():
            print(json.dumps({"node-id": node.node_id, "status": node.status, "name": node.name,
                              "fingerprint": fingerprint_of_bytes(node.public_key)}))
    return 0


def _site_start(args: argparse.Namespace) -> int:
    from fedmeta.deploy.node import load_node_config
    from fedmeta.deploy.site import run_site, umask_owner_only

    umask_owner_only()
    if args.insecure:
        _warn_insecure()
    node = load_node_config(args.node)
    changes: dict[str, object] = {}
    if args.state is not None:
        changes["state"] = args.state.expanduser().resolve()
    if args.passphrase_file is not None:
        changes.update(key_passphrase_file=args.passphrase_file.expanduser().resolve(),
                       key_passphrase_env=None, plaintext_key=False)
    if changes:
        node = node.model_copy(update=changes)
    return run_site(node, insecure=args.insecure, say=lambda text: print(text, flush=True))


def _site_keygen(args: argparse.Namespace) -> int:
    from fedmeta.deploy.secrets import SITE_KEY, secure_folder
    from fedmeta.deploy.sitekeys import make_site_keys

    passphrase = _passphrase(args, SITE_KEY)
    folder = secure_folder(args.out)
    keys = make_site_keys(folder, comment=f"fedmeta-{args.name}",
                          passphrase=passphrase.read())
    print(f"wrote {keys.private} (keep it here) and {keys.public} (send it to the consortium "
          f"operator for `fedmeta provision --add-site NAME --public-key`); fingerprint {keys.fingerprint}")
    return 0


def _site_pin(args: argparse.Namespace) -> int:
    import yaml

    from fedmeta.common.extras import installed_version
    from fedmeta.deploy.node import load_node_config
    from fedmeta.protocol.app import code_digest

    load_node_config(args.node)  # the file must be valid before it is changed
    doc = yaml.safe_load(args.node.read_text(encoding="utf-8"))
    digest = code_digest()
    doc["app"] = {"version": installed_version(), "code_sha256": digest}
    args.node.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    print(f"{args.node}: pinned fedmeta {installed_version()}, code {digest}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from fedmeta.cli.simulate import resolve_config
    from fedmeta.common.config import load_config
    from fedmeta.common.data.registry import data_spec
    from fedmeta.deploy.control import Control
    from fedmeta.deploy.launch import CoordinatorLayout, follow_run, submit_run
    from fedmeta.protocol import run_name
    from fedmeta.server.runfolder import load_run_config

    layout = CoordinatorLayout(deployment=args.deployment, state=args.state)
    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the run's saved config; pass changes with --set")
        name = run_name.check(args.resume)
        folder = layout.runs / name
        cfg = load_run_config(folder, args.overrides)
        if not (folder / "checkpoint.safetensors").is_file():
            raise ConfigError(f"{folder}: no checkpoint to resume from")
    else:
        cfg = load_config(resolve_config(args.config), args.overrides, allow_empty=False)
        name = run_name.chosen(args.name or "", cfg.algorithm)
        if (layout.runs / name).exists():
            raise ConfigError(f"{layout.runs / name}: a run of that name exists; --resume {name} "
                              "continues it, --name picks another")
    spec = data_spec(cfg.data)  # every file the experiment names must be there before submitting
    if args.secagg:
        from fedmeta.server.secagg_app import refusal

        why = refusal(cfg, spec)
        if why is not None:
            raise ConfigError(f"--secagg: {why}")
    _coordinator_env(args)  # then the coordinator must be running
    from fedmeta.server.audit import open_log

    with Control(layout.socket) as control:
        run_id = submit_run(control, layout.flwr_home,
                            run_config={"experiment": cfg.to_json(), "run-name": name,
                                        "resume": bool(args.resume)},
                            secure_aggregation=args.secagg)
        open_log(layout.audit).record("run_submitted", run_id=run_id, sites=[])
        print(f"submitted run {run_id} ({cfg.algorithm}, {cfg.rounds} rounds); run folder "
              f"{layout.runs / name}", flush=True)
        status = follow_run(control, run_id, timeout=args.timeout, stream=not args.no_stream,
                            write=lambda text: print(text, flush=True))
    print(f"run {run_id}: {status}")
    if args.out is not None and (layout.runs / name).is_dir():
        import shutil

        args.out.mkdir(parents=True, exist_ok=True)
        for f in (layout.runs / name).iterdir():
            if f.is_file():
                shutil.copy2(f, args.out / f.name)
        print(f"outputs copied to {args.out}")
    return 0 if status == "finished:completed" else 1


def _deploy_local(args: argparse.Namespace) -> int:
    from fedmeta.cli.simulate import resolve_config
    from fedmeta.deploy.local import deploy_local

    if args.insecure:
        _warn_insecure()
    res = deploy_local(
        sites=args.sites, rounds=args.rounds, out=args.out, config=resolve_config(args.config),
        overrides=args.overrides, insecure=args.insecure, run_timeout=args.timeout,
        secagg=args.secagg, stream=not args.no_stream,
    )
    print(f"run {res.run_id} {res.status}: provision {res.provision_s:.1f} s, start "
          f"{res.startup_s:.1f} s, run {res.run_s:.1f} s, total {res.total_s:.1f} s; "
          f"summary {res.summary}")
    if res.leftovers:
        print(f"WARNING: processes still running: {res.leftovers}", file=sys.stderr)
        return 1
    return 0
