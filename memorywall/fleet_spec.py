"""The fleet spec: `[[worker]]` tables and an optional `[gateway]`, checked field by field."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memorywall.core import load_hardware, load_model
from memorywall.core._toml import load_toml
from memorywall.core.kv_transfer import parse_link
from memorywall.errors import ConfigError, MemorywallError

# smg 1.13's --policy choices.
POLICIES = (
    "random",
    "round_robin",
    "passthrough",
    "cache_aware",
    "power_of_two",
    "least_load",
    "manual",
    "consistent_hashing",
    "prefix_hash",
)
GATEWAY_LOG = "gateway"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_WORKER_KEYS = {"name", "hardware", "model", "devices", "port", "http_port", "role", "kv_link"}
# Disaggregated serving: a fleet of prefill and decode workers, behind smg's PD mode.
ROLES = ("both", "prefill", "decode")
_GATEWAY_KEYS = {"policy", "port"}


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    hardware: str
    model: str
    devices: int | None = None
    port: int = 0  # gRPC; 0: any free port
    http_port: int | None = None
    role: str = "both"  # prefill, decode, or both phases (`serve --role`)
    kv_link: str | None = None  # a decode worker's `--kv-link` (nvlink, nic, GB/s)


@dataclass(frozen=True)
class GatewaySpec:
    policy: str = "cache_aware"
    port: int = 30000  # 0: any free port


@dataclass(frozen=True)
class FleetSpec:
    workers: tuple[WorkerSpec, ...]
    gateway: GatewaySpec | None = None

    @property
    def disaggregated(self) -> bool:
        """Prefill and decode workers (the gateway runs in smg's PD mode)."""
        return any(w.role != "both" for w in self.workers)


def load_spec(path: Path) -> FleetSpec:
    """Read and check a fleet spec; every problem is a one-line ConfigError naming the field."""
    return parse_spec(load_toml(path), str(path))


def _port(origin: str, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(f"{origin}: {field}: must be an integer 0-65535, got {value!r}")
    return value


def _text(origin: str, field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{origin}: {field}: must be a non-empty string, got {value!r}")
    return value


def _unknown(origin: str, where: str, table: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise ConfigError(
            f"{origin}: {where}{extra[0]}: unknown field (expected: {', '.join(sorted(allowed))})"
        )


def _worker(origin: str, i: int, raw: Any) -> WorkerSpec:
    where = f"worker[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: {where}: must be a table ([[worker]])")
    _unknown(origin, f"{where}.", raw, _WORKER_KEYS)
    for key in ("name", "hardware", "model"):
        if key not in raw:
            raise ConfigError(f"{origin}: {where}.{key}: missing")
    name = _text(origin, f"{where}.name", raw["name"])
    if not _NAME.fullmatch(name) or name == GATEWAY_LOG:
        raise ConfigError(
            f"{origin}: {where}.name: {name!r} must be letters, digits, '.', '_', '-' "
            f"(it names the log file) and not {GATEWAY_LOG!r}"
        )
    hardware = _text(origin, f"{where}.hardware", raw["hardware"])
    model = _text(origin, f"{where}.model", raw["model"])
    for key, load in (("hardware", load_hardware), ("model", load_model)):
        try:
            load(raw[key])
        except MemorywallError as e:
            raise ConfigError(f"{origin}: {where}.{key}: {e}") from None
    devices = raw.get("devices")
    if devices is not None and (
        isinstance(devices, bool) or not isinstance(devices, int) or devices < 1
    ):
        raise ConfigError(f"{origin}: {where}.devices: must be a positive integer, got {devices!r}")
    http_port = raw.get("http_port")
    role = raw.get("role", "both")
    if role not in ROLES:
        raise ConfigError(f"{origin}: {where}.role: {role!r} is not one of {', '.join(ROLES)}")
    kv_link = raw.get("kv_link")
    if kv_link is not None:
        if role != "decode":
            raise ConfigError(f"{origin}: {where}.kv_link: only a decode worker takes one")
        if isinstance(kv_link, bool) or not isinstance(kv_link, str | int | float):
            raise ConfigError(f"{origin}: {where}.kv_link: expected nvlink, nic or GB/s")
        kv_link = str(kv_link)
        try:
            parse_link(kv_link)
        except ConfigError as e:
            raise ConfigError(f"{origin}: {where}.kv_link: {e}") from None
    return WorkerSpec(
        name=name,
        hardware=hardware,
        model=model,
        devices=devices,
        port=_port(origin, f"{where}.port", raw.get("port", 0)),
        http_port=None if http_port is None else _port(origin, f"{where}.http_port", http_port),
        role=role,
        kv_link=kv_link,
    )


def parse_spec(data: dict[str, Any], origin: str = "fleet spec") -> FleetSpec:
    _unknown(origin, "", data, {"worker", "gateway"})
    raw_workers = data.get("worker")
    if not isinstance(raw_workers, list) or not raw_workers:
        raise ConfigError(f"{origin}: worker: needs at least one [[worker]] table")
    workers = tuple(_worker(origin, i, w) for i, w in enumerate(raw_workers))
    seen_names: set[str] = set()
    seen_ports: set[int] = set()
    for i, w in enumerate(workers):
        if w.name in seen_names:
            raise ConfigError(f"{origin}: worker[{i}].name: {w.name!r} is used twice")
        seen_names.add(w.name)
        for key, p in (("port", w.port), ("http_port", w.http_port)):
            if p:
                if p in seen_ports:
                    raise ConfigError(f"{origin}: worker[{i}].{key}: port {p} is used twice")
                seen_ports.add(p)
    roles = {w.role for w in workers}
    if roles != {"both"} and roles != {"prefill", "decode"}:
        raise ConfigError(
            f"{origin}: worker.role: a disaggregated fleet needs prefill and decode workers "
            f"and no others, got {', '.join(sorted(roles))}"
        )
    gateway = None
    if "gateway" in data:
        raw = data["gateway"]
        if not isinstance(raw, dict):
            raise ConfigError(f"{origin}: gateway: must be a table ([gateway])")
        _unknown(origin, "gateway.", raw, _GATEWAY_KEYS)
        policy = raw.get("policy", GatewaySpec.policy)
        if policy not in POLICIES:
            raise ConfigError(
                f"{origin}: gateway.policy: {policy!r} is not one of {', '.join(POLICIES)}"
            )
        if policy == "power_of_two" and len(workers) < 2:
            raise ConfigError(f"{origin}: gateway.policy: power_of_two needs at least 2 workers")
        gw_port = _port(origin, "gateway.port", raw.get("port", GatewaySpec.port))
        if gw_port and gw_port in seen_ports:
            raise ConfigError(f"{origin}: gateway.port: port {gw_port} is used by a worker")
        gateway = GatewaySpec(policy=policy, port=gw_port)
    return FleetSpec(workers=workers, gateway=gateway)
