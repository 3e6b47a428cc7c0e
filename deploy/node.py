"""A hospital's node file (``node.yaml``): how its node reaches the coordinator, which data it
serves, which app it runs and what it allows.

Written by ``fedmeta provision`` into each site bundle, edited and owned by the hospital, read by
``fedmeta site start --node node.yaml``. Relative paths are resolved against the file's folder::

    site: cleveland
    superlink: coordinator.example.org:9092   # the coordinator's gRPC Fleet API (TLS)
    root_certificates: ca.crt                 # consortium CA (verifies the coordinator)
    auth_private_key: supernode.key           # this hospital's identity, encrypted at rest
    key_passphrase_file: /etc/fedmeta/key.pass  # or key_passphrase_env: NAME, or plaintext_key: true
    runtime_port: 9094                        # local port between the SuperNode and the worker
    data: /srv/fedmeta/data/site.yaml         # this hospital's data description (kind: ehr, ...)
    # data: {source: fed-heart, site: Cleveland}   # or a source installed with fedmeta (demos)
    state: state                              # logs and the site's audit.jsonl (0700)
    poll_interval_s: 3                        # longest wait between asks for work when idle (20 ms after a task)
    app:
      version: 0.2.0                          # the fedmeta this hospital installed and accepts
      code_sha256: null                       # `fedmeta site pin` records the installed code
    policy:                                   # every value (sitecore.policy.SitePolicy); none may be left out
      min_patients: 20
      require_dp: false
      max_rounds: 1000
      ...

This is not the hospital's data description (``site.yaml``, ``kind: ehr``/``images``), which
``fedmeta data check --site`` reads; each loader recognises the other file and says so.
Read like every fedmeta YAML file (:mod:`fedmeta.common.yamlio`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedmeta.common.errors import ConfigError
from fedmeta.common.yamlio import Bool, fail, integer, number, read_mapping, validate
from fedmeta.deploy.consortium import DeployModel
from fedmeta.deploy.secrets import KeyRole, Passphrase
from fedmeta.sitecore.policy import SitePolicy

NODE_FILE = "node.yaml"


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


def _resolve(value: Any, info: ValidationInfo, *, must_exist: bool) -> Path:
    """A path from the file (relative to its folder); built in code, taken as given."""
    if isinstance(value, Path) and info.context is None:
        return value
    p = Path(_text(str(value) if isinstance(value, Path) else value)).expanduser()
    if info.context is None:
        return p
    p = p if p.is_absolute() else Path(info.context.get("folder", ".")) / p
    if must_exist and not p.is_file():
        raise fail(f"{{key}} points to {str(p)!r}, which is not a file")
    return p


def _existing_file(value: Any, info: ValidationInfo) -> Path:
    return _resolve(value, info, must_exist=True)


def _any_path(value: Any, info: ValidationInfo) -> Path:
    return _resolve(value, info, must_exist=False)


File = Annotated[Path, BeforeValidator(_existing_file)]
SomePath = Annotated[Path, BeforeValidator(_any_path)]


class BuiltinData(DeployModel):
    """A data source installed with fedmeta, for demonstrations and tests: ``source`` and one
    of its sites, by ``site`` name or by ``partition`` index (``synth_*`` for generated ones)."""

    source: Annotated[str, BeforeValidator(_text)]
    site: Annotated[str, BeforeValidator(_text)] | None = None
    partition: Annotated[int, integer(ge=0)] | None = None
    path: str = ""
    synth_sites: int = 10
    synth_seed: int = 0

    @model_validator(mode="after")
    def _one_site(self) -> BuiltinData:
        if (self.site is None) == (self.partition is None):
            raise fail("{key} names its site with exactly one of site: NAME or partition: N", key="data")
        return self


class AppPin(DeployModel):
    """The fedmeta this hospital installed: runs of any other app, or of another version, are
    refused at the site; ``code_sha256`` (``fedmeta site pin``) also pins the installed code."""

    version: Annotated[str, BeforeValidator(_text)]
    code_sha256: Annotated[str, BeforeValidator(_text)] | None = None


class NodeConfig(DeployModel):
    """Validated content of ``node.yaml``; paths are absolute and the key files exist."""

    site: Annotated[str, BeforeValidator(_text)]
    superlink: Annotated[str, BeforeValidator(_superlink)]
    root_certificates: File
    auth_private_key: File
    key_passphrase_file: SomePath | None = None
    key_passphrase_env: Annotated[str, BeforeValidator(_text)] | None = None
    plaintext_key: Bool = False
    runtime_port: Annotated[int, BeforeValidator(_port)] = 9094
    data: Path | BuiltinData | None = None
    state: SomePath = Path("state")
    #: the longest wait between two asks for work once the site is idle (while a run's messages
    #: flow, the polls stay within 0.2 s): :mod:`fedmeta.deploy.supernode`
    poll_interval_s: Annotated[float, number(gt=0, le=30)] = 3.0
    app: AppPin | None = None
    policy: SitePolicy
    source: str = Field(default="<memory>", exclude=True)

    @field_validator("policy", mode="before")
    @classmethod
    def _every_policy_value(cls, value: Any) -> Any:
        """A deployed site states every policy value: a missing one is an error, never a
        default (a renamed or forgotten key would otherwise loosen the site without a word)."""
        if isinstance(value, dict):
            missing = [k for k in SitePolicy.model_fields if k not in value]
            if missing:
                raise fail(f"{{key}}: missing {', '.join(missing)}: node.yaml states every policy value "
                           "(fedmeta provision writes them all, with the recommended values); a "
                           "missing one is an error, never a default")
        return value

    @field_validator("data", mode="before")
    @classmethod
    def _data(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or isinstance(value, Path | BuiltinData):
            return value
        if isinstance(value, str):
            return _any_path(value, info)
        if isinstance(value, dict):
            try:
                return BuiltinData.model_validate(value)
            except ValidationError as e:
                first = e.errors(include_url=False)[0]
                message = str((first.get("ctx") or {}).get("fedmeta_message", first["msg"]))
                where = ".".join(str(p) for p in first["loc"])
                raise fail("{key}" + (f".{where}" if where else "") + ": "
                           + message.replace("{key}", "data").replace("{value}", repr(value))) from None
        raise fail("{key} must be the path of a data description or a mapping "
                   "{source: NAME, site: NAME}, got {value}")

    @model_validator(mode="after")
    def _one_passphrase(self) -> NodeConfig:
        given = [self.key_passphrase_file is not None, self.key_passphrase_env is not None,
                 self.plaintext_key]
        if sum(given) > 1:
            raise fail("{key}: give one of key_passphrase_file, key_passphrase_env, plaintext_key",
                       key="key_passphrase_file")
        return self

    def passphrase(self) -> Passphrase:
        """Where this node's key passphrase comes from (``$FEDMETA_KEY_PASSPHRASE`` when
        node.yaml names none); a missing one is an error naming the site's key."""
        role = KeyRole(self.key_name(), "key_passphrase_file:", "key_passphrase_env:")
        return Passphrase.from_options(file=self.key_passphrase_file, env=self.key_passphrase_env,
                                       plaintext=self.plaintext_key, role=role)

    def key_name(self) -> str:
        """How errors name this node's key."""
        return f"site {self.site}'s key"

    def node_config(self) -> dict[str, str | int]:
        """What the site core is told about its data (:func:`fedmeta.sitecore.data.site_for_node`)."""
        if self.data is None:
            raise ConfigError(f"{self.source}: names no data; set data: PATH of this hospital's "
                              "data description (site.yaml)")
        if isinstance(self.data, Path):
            return {"site-config": str(self.data)}
        out: dict[str, str | int] = {"source": self.data.source, "synth-sites": self.data.synth_sites,
                                     "synth-seed": self.data.synth_seed}
        if self.data.path:
            out["path"] = self.data.path
        if self.data.site is not None:
            out["site"] = self.data.site
        else:
            assert self.data.partition is not None
            out["partition-id"] = self.data.partition
        return out

    def state_dir(self) -> Path:
        return self.state


def recommended_policy() -> dict[str, Any]:
    """Every policy value, as ``fedmeta provision`` writes it into a new ``node.yaml``."""
    return SitePolicy().model_dump(mode="json")


def render_node_yaml(*, site: str, superlink: str, runtime_port: int, data: str | dict[str, Any] | None,
                     version: str, plaintext_key: bool) -> str:
    """The template written into a bundle (paths relative to the bundle folder)."""
    doc: dict[str, Any] = {
        "site": site,
        "superlink": superlink,
        "root_certificates": "ca.crt",
        "auth_private_key": "supernode.key",
    }
    if plaintext_key:
        doc["plaintext_key"] = True
    doc.update({
        "runtime_port": runtime_port,
        "data": data,
        "state": "state",
        "app": {"version": version, "code_sha256": None},
        "policy": recommended_policy(),
    })
    header = (
        f"# fedmeta node file for {site!r}. Keep supernode.key secret (mode 0600).\n"
        "# data: the path of this hospital's data description (site.yaml, kind: ehr or images).\n"
        "# The key is encrypted with its own passphrase: give it with key_passphrase_file: FILE\n"
        "# (mode 0600) or key_passphrase_env: NAME, or set $FEDMETA_KEY_PASSPHRASE.\n"
        "# app pins the fedmeta this hospital installed; `fedmeta site pin --node node.yaml` adds\n"
        "# the installed code's hash. policy: what this site allows (see deploy/README.md).\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False)


def parse_node_config(data: dict[str, Any], *, source: Path) -> NodeConfig:
    """Validate a parsed node file read from ``source``."""
    if "kind" in data and "superlink" not in data:
        raise ConfigError(
            f"{source}: this is a site data description (kind: {data['kind']}), not a node file; "
            f"`fedmeta site start --node` wants the {NODE_FILE} of the site bundle, which names "
            "this data description"
        )
    node = validate(NodeConfig, data, source=source, context={"folder": source.parent.resolve()})
    return node.model_copy(update={"source": str(source)})


def load_node_config(path: Path) -> NodeConfig:
    """Read and validate ``node.yaml``; the key and CA files must exist."""
    path = Path(path)
    return parse_node_config(read_mapping(path, what="node file"), source=path)


__all__ = ["NODE_FILE", "AppPin", "BuiltinData", "NodeConfig", "load_node_config",
           "parse_node_config", "render_node_yaml"]
