"""A hospital's node file (``node.yaml``): how its node reaches the coordinator and finds its data.

Written by ``fedmeta provision`` into each site bundle, edited by the hospital, read by
``fedmeta site start --node node.yaml``. Relative paths are resolved against the file's folder::

    site: cleveland
    superlink: coordinator.example.org:9092   # the coordinator's gRPC Fleet API
    root_certificates: ca.crt                 # consortium CA (verifies the coordinator)
    auth_private_key: supernode.key           # this hospital's identity (mode 0600)
    runtime_port: 9094                        # local port between SuperNode and ClientApp
    node_config:                              # passed to the ClientApp as context.node_config
      partition-id: 0
      num-partitions: 4
      # site-config: /srv/fedmeta/data.yaml   # the hospital's data description

This is not the hospital's data description (``site.yaml``, ``kind: ehr``/``images``), which
``fedmeta data check --site`` reads; each loader recognises the other file and says so.
Read like every fedmeta YAML file (:mod:`fedmeta.common.yamlio`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BeforeValidator, Field, ValidationInfo, field_validator

from fedmeta.common.errors import ConfigError
from fedmeta.common.yamlio import fail, read_mapping, validate
from fedmeta.deploy.consortium import DeployModel

NODE_FILE = "node.yaml"
NODE_CONFIG_KEY = re.compile(r"^[a-z][a-z0-9-]*$")


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise fail("{key} must be a non-empty string, got {value}")
    return value


def _superlink(value: Any) -> str:
    value = _text(value)
    if ":" not in value:
        raise fail("{key} must be HOST:PORT, got {value}")
    return value


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise fail("{key} must be an integer in [1, 65535], got {value}")
    return value


def _existing_file(value: Any, info: ValidationInfo) -> Path:
    """Read from a file: resolved against its folder and required to exist. Built in code
    (tests, ``deploy local``): taken as given."""
    if isinstance(value, Path) and info.context is None:
        return value
    text = _text(str(value) if isinstance(value, Path) else value)
    p = Path(text).expanduser()
    if info.context is None:
        return p
    base = Path(info.context.get("folder", "."))
    p = p if p.is_absolute() else base / p
    if not p.is_file():
        raise fail(f"{{key}} points to {str(p)!r}, which is not a file")
    return p


NodeValue = str | int | float | bool


class NodeConfig(DeployModel):
    """Validated content of ``node.yaml``; paths are absolute and the files exist."""

    site: Annotated[str, BeforeValidator(_text)]
    superlink: Annotated[str, BeforeValidator(_superlink)]
    root_certificates: Annotated[Path, BeforeValidator(_existing_file)]
    auth_private_key: Annotated[Path, BeforeValidator(_existing_file)]
    runtime_port: Annotated[int, BeforeValidator(_port)] = 9094
    node_config: dict[str, NodeValue] = Field(default_factory=dict)
    source: str = Field(default="<memory>", exclude=True)

    @field_validator("node_config", mode="before")
    @classmethod
    def _node_config(cls, value: Any) -> dict[str, NodeValue]:
        value = value or {}
        if not isinstance(value, dict):
            raise fail("{key} must be a mapping, got {value}")
        for k, v in value.items():
            if not isinstance(k, str) or not NODE_CONFIG_KEY.match(k):
                raise fail(f"node_config key {k!r} must match {NODE_CONFIG_KEY.pattern}")
            if not isinstance(v, str | int | float | bool):
                raise fail(f"node_config.{k} must be a scalar, got {v!r}")
        return dict(value)

    def node_config_arg(self) -> str:
        """The ``--node-config`` string Flower parses as TOML values (strings quoted)."""
        parts = []
        for k, v in self.node_config.items():
            if isinstance(v, bool):
                parts.append(f"{k}={'true' if v else 'false'}")
            elif isinstance(v, int | float):
                parts.append(f"{k}={v}")
            else:
                escaped = str(v).replace("\\", "\\\\").replace('"', '\\"')
                parts.append(f'{k}="{escaped}"')
        return " ".join(parts)


def render_node_yaml(
    *,
    site: str,
    superlink: str,
    runtime_port: int,
    node_config: dict[str, NodeValue],
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
        f"# fedmeta node file for {site!r}. Keep supernode.key secret (mode 0600).\n"
        "# node_config reaches the ClientApp as context.node_config; add\n"
        "#   site-config: /path/to/this-hospital-data.yaml\n"
        "# to point the client at local data.\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False)


def load_node_config(path: Path) -> NodeConfig:
    """Read and validate ``node.yaml``; the key and CA files must exist."""
    path = Path(path)
    data = read_mapping(path, what="node file")
    if "kind" in data and "superlink" not in data:
        raise ConfigError(
            f"{path}: this is a site data description (kind: {data['kind']}), not a node file; "
            f"`fedmeta site start --node` wants the {NODE_FILE} of the site bundle, which names "
            "this data description"
        )
    node = validate(NodeConfig, data, source=path, context={"folder": path.parent.resolve()})
    return node.model_copy(update={"source": str(path)})
