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
      control_port: 9093                  # HTTPS Control/Runtime API, operators only
      validity_days: 825                  # default 825, at most the CA's
    sites:
      - name: cleveland                   # required, [a-z0-9-], unique
        partition_id: 0                   # optional: index into the experiment's data source
        site_config: /srv/fedmeta/site-data.yaml   # optional: data description on that host
        runtime_port: 9094                # the SuperNode's local ClientApp port, default 9094

Loading validates everything once; unknown keys are rejected and every error names the file,
the key and the offending value.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedmeta.common.errors import ConfigError

LOOPBACK_SANS = ("localhost", "127.0.0.1")
SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
DNS_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


@dataclass(frozen=True)
class CASettings:
    common_name: str
    validity_days: int = 3650


@dataclass(frozen=True)
class CoordinatorSettings:
    host: str
    sans: tuple[str, ...]
    fleet_port: int = 9092
    control_port: int = 9093
    validity_days: int = 825

    @property
    def fleet_address(self) -> str:
        return f"{self.host}:{self.fleet_port}"


@dataclass(frozen=True)
class SiteSettings:
    name: str
    partition_id: int | None = None
    site_config: str | None = None
    runtime_port: int = 9094


@dataclass(frozen=True)
class Consortium:
    name: str
    ca: CASettings
    coordinator: CoordinatorSettings
    sites: tuple[SiteSettings, ...] = field(default_factory=tuple)
    source: str = "<memory>"

    def site(self, name: str) -> SiteSettings:
        for s in self.sites:
            if s.name == name:
                return s
        raise ConfigError(
            f"{self.source}: sites: no site named {name!r} (known: {[s.name for s in self.sites]})"
        )


class _Reader:
    """Pulls typed values out of a mapping, naming file and dotted key in every error."""

    def __init__(self, source: str, data: Any, where: str) -> None:
        self.source = source
        self.where = where
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: {where or 'top level'}: expected a mapping, got {type(data).__name__} "
                f"{data!r}"
            )
        self.data = data

    def key(self, k: str) -> str:
        return f"{self.where}.{k}" if self.where else k

    def reject_unknown(self, allowed: set[str]) -> None:
        for k in self.data:
            if k not in allowed:
                raise ConfigError(
                    f"{self.source}: unknown key {self.key(str(k))!r} (value {self.data[k]!r}); "
                    f"allowed: {sorted(allowed)}"
                )

    def str_(self, k: str, default: str | None = None, *, required: bool = False) -> str | None:
        if k not in self.data:
            if required:
                raise ConfigError(f"{self.source}: missing required key {self.key(k)!r}")
            return default
        v = self.data[k]
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(
                f"{self.source}: {self.key(k)} must be a non-empty string, got {v!r}"
            )
        return v

    def int_(self, k: str, default: int | None, *, lo: int, hi: int) -> int | None:
        if k not in self.data:
            return default
        v = self.data[k]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(
                f"{self.source}: {self.key(k)} must be an integer in [{lo}, {hi}], got {v!r}"
            )
        if not lo <= v <= hi:
            raise ConfigError(
                f"{self.source}: {self.key(k)} must be in [{lo}, {hi}], got {v!r}"
            )
        return v


def _check_host(source: str, key: str, value: str) -> str:
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not DNS_NAME.match(value):
        raise ConfigError(
            f"{source}: {key} must be a DNS name or an IP address, got {value!r}"
        )
    return value


def parse_consortium(data: Any, *, source: str = "<memory>") -> Consortium:
    """Validate a parsed YAML document and build a :class:`Consortium`."""
    top = _Reader(source, data, "")
    top.reject_unknown({"consortium", "ca", "coordinator", "sites"})
    name = top.str_("consortium", required=True)
    assert name is not None

    ca_r = _Reader(source, data.get("ca", {}), "ca")
    ca_r.reject_unknown({"common_name", "validity_days"})
    ca = CASettings(
        common_name=ca_r.str_("common_name", f"{name} CA") or f"{name} CA",
        validity_days=ca_r.int_("validity_days", 3650, lo=1, hi=36500) or 3650,
    )

    if "coordinator" not in data:
        raise ConfigError(f"{source}: missing required key 'coordinator'")
    co_r = _Reader(source, data["coordinator"], "coordinator")
    co_r.reject_unknown({"host", "sans", "fleet_port", "control_port", "validity_days"})
    host = _check_host(source, "coordinator.host", co_r.str_("host", required=True) or "")
    raw_sans = co_r.data.get("sans", [host])
    if not isinstance(raw_sans, list) or not raw_sans:
        raise ConfigError(
            f"{source}: coordinator.sans must be a non-empty list of names, got {raw_sans!r}"
        )
    sans: list[str] = []
    for i, s in enumerate(raw_sans):
        if not isinstance(s, str):
            raise ConfigError(f"{source}: coordinator.sans[{i}] must be a string, got {s!r}")
        sans.append(_check_host(source, f"coordinator.sans[{i}]", s))
    if host not in sans:
        sans.insert(0, host)
    # The SuperLink's own ServerApp runner reaches its Runtime API on the loopback address
    # over TLS with this certificate, so loopback names are always included.
    sans += [s for s in LOOPBACK_SANS if s not in sans]
    fleet_port = co_r.int_("fleet_port", 9092, lo=1, hi=65535) or 9092
    control_port = co_r.int_("control_port", 9093, lo=1, hi=65535) or 9093
    if fleet_port == control_port:
        raise ConfigError(
            f"{source}: coordinator.control_port must differ from coordinator.fleet_port "
            f"(both {fleet_port})"
        )
    validity = co_r.int_("validity_days", 825, lo=1, hi=36500) or 825
    if validity > ca.validity_days:
        raise ConfigError(
            f"{source}: coordinator.validity_days ({validity}) must not exceed "
            f"ca.validity_days ({ca.validity_days})"
        )
    coordinator = CoordinatorSettings(
        host=host,
        sans=tuple(dict.fromkeys(sans)),
        fleet_port=fleet_port,
        control_port=control_port,
        validity_days=validity,
    )

    raw_sites = data.get("sites")
    if not isinstance(raw_sites, list) or not raw_sites:
        raise ConfigError(
            f"{source}: sites must be a non-empty list of hospitals, got {raw_sites!r}"
        )
    sites: list[SiteSettings] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_sites):
        r = _Reader(source, raw, f"sites[{i}]")
        r.reject_unknown({"name", "partition_id", "site_config", "runtime_port"})
        site_name = r.str_("name", required=True) or ""
        if not SITE_NAME.match(site_name):
            raise ConfigError(
                f"{source}: sites[{i}].name must match {SITE_NAME.pattern} "
                f"(lower-case letters, digits, '-'), got {site_name!r}"
            )
        if site_name in seen:
            raise ConfigError(f"{source}: sites[{i}].name {site_name!r} is listed twice")
        seen.add(site_name)
        sites.append(
            SiteSettings(
                name=site_name,
                partition_id=r.int_("partition_id", None, lo=0, hi=1_000_000),
                site_config=r.str_("site_config"),
                runtime_port=r.int_("runtime_port", 9094, lo=1, hi=65535) or 9094,
            )
        )
    return Consortium(
        name=name, ca=ca, coordinator=coordinator, sites=tuple(sites), source=source
    )


def load_consortium(path: Path) -> Consortium:
    """Read and validate ``consortium.yaml``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read consortium file: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return parse_consortium(data, source=str(path))
