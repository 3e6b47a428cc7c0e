"""The consortium description (``consortium.yaml``): who is the coordinator, which hospitals join.

Example::

    consortium: heart-consortium          # required; also the certificates' organisation
    ca:
      common_name: Heart Consortium CA    # default: "<consortium> CA"
      validity_days: 3650                 # default 3650
    coordinator:
      host: coordinator.example.org       # required: the name hospitals dial
      sans: [coordinator.example.org, 10.0.0.5]   # default [host]; host, localhost and
                                                  # 127.0.0.1 are always included
      fleet_port: 9092                    # gRPC Fleet API, the only port hospitals reach
      control_port: 9093                  # unused: the Control API is a Unix socket in the
                                          # coordinator's state folder (kept for older files)
      validity_days: 825                  # default 825, at most the CA's
    sites:
      - name: cleveland                   # required, [a-z0-9-], unique
        partition_id: 0                   # optional: index into the experiment's data source
        site_config: /srv/fedmeta/site-data.yaml   # optional: data description on that host
        runtime_port: 9094                # the SuperNode's local ClientApp port, default 9094
        public_key: keys/cleveland.pub    # optional: the supernode.pub the hospital made with
                                          # `fedmeta site keygen` (relative to this file); a
                                          # site without one is provisioned once it sends it

Read like every fedmeta YAML file (:mod:`fedmeta.common.yamlio`): validated once, unknown keys
rejected, and every error names the file, the key and the offending value.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, model_validator

from fedmeta.common.errors import ConfigError
from fedmeta.common.yamlio import YamlModel, fail, read_document, validate

LOOPBACK_SANS = ("localhost", "127.0.0.1")
SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
DNS_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def bounded_int(lo: int, hi: int) -> BeforeValidator:
    """For ``Annotated[int, bounded_int(lo, hi)]``: an integer in ``[lo, hi]``, worded as the
    deployment files word it."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"{{key}} must be an integer in [{lo}, {hi}], got {{value}}")
        if not lo <= value <= hi:
            raise fail(f"{{key}} must be in [{lo}, {hi}], got {{value}}")
        return value

    return BeforeValidator(check)


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise fail("{key} must be a non-empty string, got {value}")
    return value


def _host(value: Any) -> str:
    if not isinstance(value, str):
        raise fail("{key} must be a string, got {value}")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not DNS_NAME.match(value):
        raise fail("{key} must be a DNS name or an IP address, got {value}")
    return value


Text = Annotated[str, BeforeValidator(_text)]
Host = Annotated[str, BeforeValidator(_host)]
Port = Annotated[int, bounded_int(1, 65535)]
Days = Annotated[int, bounded_int(1, 36500)]


class DeployModel(YamlModel):
    """Base of the deployment files: messages name the quoted dotted key and its value."""

    @classmethod
    def unknown_key_message(cls, key: str, value: Any, allowed: Sequence[str], section: str) -> str:
        return f"unknown key {key!r} (value {value!r}); allowed: {sorted(allowed)}"

    @classmethod
    def missing_key_message(cls, key: str) -> str:
        return f"missing required key {key!r}"


class CASettings(DeployModel):
    common_name: Text = ""
    validity_days: Days = 3650


class CoordinatorSettings(DeployModel):
    host: Host
    sans: tuple[Host, ...] = ()
    fleet_port: Port = 9092
    control_port: Port = 9093
    validity_days: Days = 825

    @property
    def fleet_address(self) -> str:
        return f"{self.host}:{self.fleet_port}"

    @model_validator(mode="before")
    @classmethod
    def _sans_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and "sans" in data:
            sans = data["sans"]
            if not isinstance(sans, list) or not sans:
                raise fail("{key} must be a non-empty list of names, got {value}",
                           value=sans, key="coordinator.sans")
        return data

    @model_validator(mode="after")
    def _complete(self) -> CoordinatorSettings:
        sans = list(self.sans) or [self.host]
        if self.host not in sans:
            sans.insert(0, self.host)
        # `fedmeta coordinator start` checks the Fleet API's TLS handshake on the loopback address
        # when it is bound to every interface, so loopback names are always included.
        sans += [s for s in LOOPBACK_SANS if s not in sans]
        if self.fleet_port == self.control_port:
            raise fail(f"{{key}} must differ from coordinator.fleet_port (both {self.fleet_port})",
                       key="coordinator.control_port")
        return self.model_copy(update={"sans": tuple(dict.fromkeys(sans))})


def _site_name(value: Any) -> str:
    if not isinstance(value, str) or not SITE_NAME.match(value):
        raise fail(f"{{key}} must match {SITE_NAME.pattern} (lower-case letters, digits, '-'), "
                   "got {value}")
    return value


class SiteSettings(DeployModel):
    name: Annotated[str, BeforeValidator(_site_name)]
    partition_id: Annotated[int, bounded_int(0, 1_000_000)] | None = None
    site_config: Text | None = None
    runtime_port: Port = 9094
    public_key: Text | None = None


def _sites(value: Any) -> Any:
    if not isinstance(value, list) or not value:
        raise fail("{key} must be a non-empty list of hospitals, got {value}")
    return value


class Consortium(DeployModel):
    name: Text = Field(alias="consortium")
    ca: CASettings = Field(default_factory=CASettings)
    coordinator: CoordinatorSettings
    sites: Annotated[tuple[SiteSettings, ...], BeforeValidator(_sites)]
    source: str = Field(default="<memory>", exclude=True)

    @model_validator(mode="after")
    def _consistent(self) -> Consortium:
        seen: set[str] = set()
        for i, s in enumerate(self.sites):
            if s.name in seen:
                raise fail(f"{{key}} {s.name!r} is listed twice", key=f"sites[{i}].name")
            seen.add(s.name)
        if self.coordinator.validity_days > self.ca.validity_days:
            raise fail(
                f"coordinator.validity_days ({self.coordinator.validity_days}) must not exceed "
                f"ca.validity_days ({self.ca.validity_days})", key="coordinator.validity_days",
            )
        ca = self.ca if self.ca.common_name else self.ca.model_copy(
            update={"common_name": f"{self.name} CA"})
        return self.model_copy(update={"ca": ca})

    def public_key(self, site: SiteSettings) -> Path | None:
        """``site``'s own public key file, relative to the consortium file's folder."""
        if site.public_key is None:
            return None
        path = Path(site.public_key).expanduser()
        return path if path.is_absolute() else Path(self.source).parent / path

    def site(self, name: str) -> SiteSettings:
        for s in self.sites:
            if s.name == name:
                return s
        raise ConfigError(
            f"{self.source}: sites: no site named {name!r} (known: {[s.name for s in self.sites]})"
        )


def parse_consortium(data: Any, *, source: str = "<memory>") -> Consortium:
    """Validate a parsed YAML document and build a :class:`Consortium`."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: top level: expected a mapping, got {type(data).__name__} {data!r}"
        )
    if "source" in data:
        raise ConfigError(f"{source}: unknown key 'source' (value {data['source']!r})")
    consortium = validate(Consortium, data, source=source)
    return consortium.model_copy(update={"source": source})


def load_consortium(path: Path) -> Consortium:
    """Read and validate ``consortium.yaml``."""
    if not path.is_file():
        raise ConfigError(f"{path}: cannot read consortium file: no such file")
    return parse_consortium(read_document(path, what="consortium file"), source=str(path))
