"""The fleet spec: `[[worker]]` tables (every `memorywall serve` option, by the same name:
`worker.py`, and `protocol`), an optional `[gateway]`, `[tls]` and `[[fault]]` schedule
(`faults.py`), checked field by field."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memorywall.core import load_toml
from memorywall.errors import ConfigError
from memorywall.fleet import worker
from memorywall.fleet.faults import WorkerFault, parse_faults
from memorywall.fleet.worker import PORT_KEYS, PROTOCOLS, WorkerSpec

__all__ = ["FleetSpec", "GatewaySpec", "TlsSpec", "WorkerSpec", "load_spec", "parse_spec"]

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
_TLS_KEYS = {"cert", "key", "client_ca", "ca"}
_GATEWAY_KEYS = {"policy", "port", "args"}


@dataclass(frozen=True)
class GatewaySpec:
    policy: str = "cache_aware"
    port: int = 30000  # 0: any free port
    args: tuple[str, ...] = ()  # more `smg launch` options (retries, circuit breaker, ...)


@dataclass(frozen=True)
class TlsSpec:
    """Every worker serves TLS with `cert`/`key` (`client_ca`: and wants client certificates);
    `ca` signs `cert`, for those who connect (default: `cert` itself, self-signed)."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    ca: Path | None = None

    @property
    def roots(self) -> Path:
        return self.ca or self.cert


@dataclass(frozen=True)
class FleetSpec:
    workers: tuple[WorkerSpec, ...]
    gateway: GatewaySpec | None = None
    tls: TlsSpec | None = None
    faults: tuple[WorkerFault, ...] = ()  # kill / pause / resume on a schedule

    @property
    def protocol(self) -> str | None:
        """The engine whose worker service the workers speak (one per gatewayed fleet)."""
        return self.workers[0].protocol

    @property
    def disaggregated(self) -> bool:
        """Prefill and decode workers (the gateway runs in smg's PD mode)."""
        return any(w.role != "both" for w in self.workers)


def load_spec(path: Path) -> FleetSpec:
    """Read and check a fleet spec; every problem is a one-line ConfigError naming the field.
    Relative paths in it (TLS files) are relative to its folder."""
    return parse_spec(load_toml(path), str(path), base=Path(path).parent)


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


def _worker(origin: str, i: int, raw: Any, base: Path | None) -> WorkerSpec:
    where = f"worker[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: {where}: must be a table ([[worker]])")
    if "name" not in raw:
        raise ConfigError(f"{origin}: {where}.name: missing")
    name = _text(origin, f"{where}.name", raw["name"])
    if not _NAME.fullmatch(name) or name == GATEWAY_LOG:
        raise ConfigError(
            f"{origin}: {where}.name: {name!r} must be letters, digits, '.', '_', '-' "
            f"(it names the log file) and not {GATEWAY_LOG!r}"
        )
    raw = _with_protocol(raw, origin, where)
    node = _text(origin, f"{where}.node", raw["node"]) if "node" in raw else None
    spec = WorkerSpec(name, node=node, **worker.check(raw, f"{origin}: {where}", base=base))
    if spec.kv_link is not None and spec.role != "decode":
        raise ConfigError(f"{origin}: {where}.kv_link: only a decode worker takes one")
    return spec


def _with_protocol(raw: dict[str, Any], origin: str, where: str) -> dict[str, Any]:
    """`protocol = "vllm"` is `grpc_services = "vllm"`: the worker serves that engine's
    service alone, so smg's service probe finds one engine (`sglang`: serve's default,
    memorywall.v1 and SGLang's). Given both, they must agree."""
    if "protocol" not in raw:
        return raw
    protocol = raw["protocol"]
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"{origin}: {where}.protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}"
        )
    if "grpc_services" in raw:
        probe = WorkerSpec("probe", grpc_services=raw["grpc_services"])
        if probe.protocol != protocol:
            raise ConfigError(
                f"{origin}: {where}.protocol: {protocol} disagrees with grpc_services "
                f"{raw['grpc_services']!r}; give one of them"
            )
        return raw
    return raw if protocol == "sglang" else {**raw, "grpc_services": protocol}


def _tls(origin: str, raw: Any, base: Path | None) -> TlsSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: tls: must be a table ([tls])")
    _unknown(origin, "tls.", raw, _TLS_KEYS)
    paths: dict[str, Path] = {}
    for key in sorted(_TLS_KEYS & set(raw)):
        path = Path(_text(origin, f"tls.{key}", raw[key]))
        if base is not None and not path.is_absolute():
            path = base / path
        if not path.is_file():
            raise ConfigError(f"{origin}: tls.{key}: no such file {str(path)!r}")
        paths[key] = path
    for key in ("cert", "key"):
        if key not in paths:
            raise ConfigError(f"{origin}: tls.{key}: missing")
    return TlsSpec(**paths)


def parse_spec(
    data: dict[str, Any], origin: str = "fleet spec", *, base: Path | None = None
) -> FleetSpec:
    _unknown(origin, "", data, {"worker", "gateway", "tls", "fault"})
    raw_workers = data.get("worker")
    if not isinstance(raw_workers, list) or not raw_workers:
        raise ConfigError(f"{origin}: worker: needs at least one [[worker]] table")
    workers = tuple(_worker(origin, i, w, base) for i, w in enumerate(raw_workers))
    seen_names: set[str] = set()
    seen_ports: set[int] = set()
    for i, w in enumerate(workers):
        if w.name in seen_names:
            raise ConfigError(f"{origin}: worker[{i}].name: {w.name!r} is used twice")
        seen_names.add(w.name)
        for key in PORT_KEYS:
            if p := w.get(key):
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
        args = raw.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) and a for a in args):
            raise ConfigError(f"{origin}: gateway.args: must be a list of strings")
        if grpc_off := [w.name for w in workers if w.get("no_grpc")]:
            raise ConfigError(
                f"{origin}: gateway: smg routes to gRPC, which {', '.join(grpc_off)} turns off"
            )
        if silent := [w.name for w in workers if w.protocol is None]:
            raise ConfigError(
                f"{origin}: gateway: {', '.join(silent)} serves no engine service smg speaks "
                f"(grpc_services needs one of {', '.join(PROTOCOLS)})"
            )
        protocols = {w.protocol or "" for w in workers}
        if len(protocols) > 1:
            raise ConfigError(
                f"{origin}: worker.protocol: one gateway backend speaks to every worker, "
                f"got {', '.join(sorted(protocols))}"
            )
        gateway = GatewaySpec(policy=policy, port=gw_port, args=tuple(args))
    tls = _tls(origin, data["tls"], base) if "tls" in data else None
    if tls is not None and gateway is not None:
        raise ConfigError(
            f"{origin}: tls: not with [gateway]: smg 1.13 connects to gRPC workers in plaintext"
        )
    faults = parse_faults(origin, data.get("fault", []), seen_names)
    return FleetSpec(workers=workers, gateway=gateway, tls=tls, faults=faults)
