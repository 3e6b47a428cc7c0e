"""A hospital's ``site.yaml``: how its SuperNode reaches the coordinator and finds its data.

Written by ``fedmeta provision`` into each site bundle, edited by the hospital, read by
``fedmeta site start --site site.yaml``. Relative paths are resolved against the file's folder::

    site: cleveland
    superlink: coordinator.example.org:9092   # the coordinator's gRPC Fleet API
    root_certificates: ca.crt                 # consortium CA (verifies the coordinator)
    auth_private_key: supernode.key           # this hospital's identity (mode 0600)
    runtime_port: 9094                        # local port between SuperNode and ClientApp
    node_config:                              # passed to the ClientApp as context.node_config
      partition-id: 0
      num-partitions: 4
      # site-config: /srv/fedmeta/data.yaml   # the hospital's data description
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedmeta.common.errors import ConfigError

NODE_CONFIG_KEY = re.compile(r"^[a-z][a-z0-9-]*$")
_ALLOWED = {"site", "superlink", "root_certificates", "auth_private_key", "runtime_port",
            "node_config"}


@dataclass(frozen=True)
class SiteConfig:
    """Validated content of ``site.yaml``; paths are absolute."""

    site: str
    superlink: str
    root_certificates: Path
    auth_private_key: Path
    runtime_port: int = 9094
    node_config: dict[str, str | int | float | bool] = field(default_factory=dict)
    source: str = "<memory>"

    def node_config_arg(self) -> str:
        """The ``--node-config`` string Flower parses as TOML values (strings quoted)."""
        parts = []
        for k, v in self.node_config.items():
            if isinstance(v, bool):
                parts.append(f"{k}={'true' if v else 'false'}")
            elif isinstance(v, (int, float)):
                parts.append(f"{k}={v}")
            else:
                escaped = str(v).replace("\\", "\\\\").replace('"', '\\"')
                parts.append(f'{k}="{escaped}"')
        return " ".join(parts)


def render_site_yaml(
    *,
    site: str,
    superlink: str,
    runtime_port: int,
    node_config: dict[str, str | int | float | bool],
) -> str:
    """The template written into a bundle (paths relative to the bundle folder)."""
    doc: dict[str, Any] = {
        "site": site,
        "superlink": superlink,
        "root_certificates": "ca.crt",
        "auth_private_key": "supernode.key",
        "runtime_port": runtime_port,
        "node_config": dict(node_config),
    }
    header = (
        f"# fedmeta site bundle for {site!r}. Keep supernode.key secret (mode 0600).\n"
        "# node_config reaches the ClientApp as context.node_config; add\n"
        "#   site-config: /path/to/this-hospital-data.yaml\n"
        "# to point the client at local data.\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False)


def load_site_config(path: Path) -> SiteConfig:
    """Read and validate ``site.yaml``; the key and CA files must exist."""
    src = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{src}: cannot read site file: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: expected a mapping, got {type(data).__name__}")
    for k in data:
        if k not in _ALLOWED:
            raise ConfigError(f"{src}: unknown key {k!r}; allowed: {sorted(_ALLOWED)}")
    for k in ("site", "superlink", "root_certificates", "auth_private_key"):
        if not isinstance(data.get(k), str) or not data[k]:
            raise ConfigError(f"{src}: {k} must be a non-empty string, got {data.get(k)!r}")
    if ":" not in data["superlink"]:
        raise ConfigError(f"{src}: superlink must be HOST:PORT, got {data['superlink']!r}")
    port = data.get("runtime_port", 9094)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{src}: runtime_port must be an integer in [1, 65535], got {port!r}")
    node_config = data.get("node_config") or {}
    if not isinstance(node_config, dict):
        raise ConfigError(f"{src}: node_config must be a mapping, got {node_config!r}")
    for k, v in node_config.items():
        if not isinstance(k, str) or not NODE_CONFIG_KEY.match(k):
            raise ConfigError(f"{src}: node_config key {k!r} must match {NODE_CONFIG_KEY.pattern}")
        if not isinstance(v, (str, int, float, bool)):
            raise ConfigError(f"{src}: node_config.{k} must be a scalar, got {v!r}")
    base = path.parent.resolve()
    paths = {}
    for k in ("root_certificates", "auth_private_key"):
        p = Path(data[k]).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            raise ConfigError(f"{src}: {k} points to {str(p)!r}, which is not a file")
        paths[k] = p
    return SiteConfig(
        site=data["site"],
        superlink=data["superlink"],
        root_certificates=paths["root_certificates"],
        auth_private_key=paths["auth_private_key"],
        runtime_port=port,
        node_config=dict(node_config),
        source=src,
    )
