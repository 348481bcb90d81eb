"""The node's configuration file (``node.toml``), checked at start with errors that name the key."""
from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..configio import from_dict, read_toml
from ..errors import ConfigError

_AE_TITLE = re.compile(r"[ -\[\]-~]{1,16}")  # PS3.5: 16 characters, no backslash, no control characters


def _check_ae_title(title: str, key: str) -> None:
    if not _AE_TITLE.fullmatch(title) or not title.strip():
        raise ValueError(f"{key} must be 1-16 printable characters without a backslash, got {title!r}")


def _check_port(port: int, key: str) -> None:
    if not 1 <= port <= 65535:
        raise ValueError(f"{key} must be a port number (1-65535), got {port}")


@dataclass(frozen=True)
class Destination:
    """Where results go by C-STORE (a PACS, a planning system)."""

    name: str
    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        _check_ae_title(self.ae_title, "ae_title")
        _check_port(self.port, "port")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", self.name):
            raise ValueError(f"name must be letters, digits, _ or - (at most 40), got {self.name!r}")
        # An empty or spaced host was accepted and failed only at the first send, a study later.
        if not re.fullmatch(r"[A-Za-z0-9.:_-]{1,253}", self.host):
            raise ValueError(f"host must be a host name or IP address, got {self.host!r}")


@dataclass(frozen=True)
class TLS:
    """TLS for the storage SCP and for sending (both or neither). ``ca_certificates``: when set,
    callers must present a certificate it signed, and destinations are verified against it."""

    certificate: str
    key: str
    ca_certificates: str = ""


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "TUMORSEG"
    host: str = "127.0.0.1"
    port: int = 11112
    #: Received instances, the job database and results; must be on a local disk (fsync).
    spool: str = "spool"
    #: A study is complete when no instance of it arrived for this long.
    idle_seconds: float = 30.0
    #: Pipeline name or file: its model, settings, and [dicom] series-selection rules.
    pipeline: str = "default"
    #: Calling AE titles allowed to associate; no one else is let in.
    allowed_callers: tuple[str, ...] = ()
    #: When not empty, the peer's IP address must be one of these addresses or in one of these
    #: networks ("10.1.2.3", "10.1.0.0/16") as well.
    allowed_hosts: tuple[str, ...] = ()
    max_associations: int = 4
    max_instance_mb: float = 256.0
    max_study_mb: float = 8192.0
    #: Also send a DICOM SEG beside the RTSTRUCT.
    send_seg: bool = False
    #: Attempts per destination before the study is marked failed, first retry after this long
    #: (doubling each time).
    send_attempts: int = 6
    retry_seconds: float = 10.0
    #: Days a study's instances and results stay in the spool after it was sent or failed (then
    #: removed, with its row); 0 keeps everything.
    keep_days: float = 7.0

    def __post_init__(self) -> None:
        _check_ae_title(self.ae_title, "ae_title")
        _check_port(self.port, "port")
        if not self.allowed_callers:
            raise ValueError("allowed_callers must list the calling AE titles allowed to send (none is open to all)")
        for title in self.allowed_callers:
            _check_ae_title(title, "allowed_callers")
        # TOML has nan and inf: an infinite idle time never completes a study, a nan keep_days never
        # empties the spool.
        for key in ("idle_seconds", "max_instance_mb", "max_study_mb", "retry_seconds"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise ValueError(f"{key} must be a positive number, got {getattr(self, key)}")
        if not (math.isfinite(self.keep_days) and self.keep_days >= 0):
            raise ValueError(f"keep_days must be 0 (keep everything) or more, got {self.keep_days}")
        _host_networks(self.allowed_hosts)  # refused now, not at the first association
        for key in ("max_associations", "send_attempts"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")

    def host_allowed(self, address: str) -> bool:
        """The peer's IP address is let in by ``allowed_hosts`` (all are where it is empty)."""
        if not self.allowed_hosts:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:10.1.2.3 from a dual-stack socket
        return any(ip in network for network in _host_networks(self.allowed_hosts))


def _host_networks(entries: tuple[str, ...]) -> list:
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"allowed_hosts: {entry!r} is no IP address or network (such as 10.1.2.3 or "
                             "10.1.0.0/16); host names are not looked up") from None
    return networks


@dataclass(frozen=True)
class NodeConfig:
    node: NodeSettings
    destinations: tuple[Destination, ...] = ()
    tls: TLS | None = None
    #: The folder the file was read from: relative paths in it are relative to that folder.
    base: Path = field(default=Path("."), compare=False)

    @property
    def spool(self) -> Path:
        return (self.base / self.node.spool).resolve()

    def path(self, text: str) -> Path:
        return (self.base / text).resolve()


def load_node_config(path: str | Path) -> NodeConfig:
    path = Path(path)
    data = read_toml(path)
    if "base" in data:  # not a setting: the file's own folder
        raise ConfigError(f"{path}: unknown key 'base'; valid keys: node, destinations, tls")
    if "node" not in data:
        raise ConfigError(f"{path}: missing the [node] table")
    config = from_dict(NodeConfig, {k: v for k, v in data.items()}, str(path))
    config = NodeConfig(config.node, config.destinations, config.tls, path.resolve().parent)
    if not config.destinations:
        raise ConfigError(f"{path}: no [[destinations]]: results would go nowhere")
    names = [d.name for d in config.destinations]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path} [[destinations]]: names must differ, got {', '.join(names)}")
    if config.tls is not None:
        for key in ("certificate", "key") + (("ca_certificates",) if config.tls.ca_certificates else ()):
            if not config.path(getattr(config.tls, key)).is_file():
                raise ConfigError(f"{path} [tls] {key}: no file {getattr(config.tls, key)!r}")
    return config
