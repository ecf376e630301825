"""A Prometheus scrape config for a running fleet, from its ready file.

`memorywall fleet SPEC --prometheus-config FILE` writes it once the fleet is up;
`memorywall fleet --from-ready READY --prometheus-config FILE` writes it for a fleet
(or one `serve`) already running. Three jobs: `memorywall` (each worker's `/metrics`),
`memorywall-dcgm` (each emulated dcgm-exporter, for workers with `dcgm_port`) and
`smg` (the gateway's metrics, if any); every target is labelled `worker` (its name
in the fleet) and `hardware` (its profile, as DCGM's `modelName`), with `model` and
`role`, which the Grafana dashboard (`memorywall grafana-dashboard`) groups by. A
worker with no metrics port (no `http_port` or `metrics_port`) gets no target, and a
comment says so.

The file is YAML written by `yamltext` (PyYAML is not a dependency).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from memorywall.errors import ConfigError
from memorywall.fleet import yamltext
from memorywall.ready import ServerReady

__all__ = ["Scrape", "from_ready_file", "render", "scrape_config", "write"]

WORKER_JOB = "memorywall"
DCGM_JOB = "memorywall-dcgm"
GATEWAY_JOB = "smg"


@dataclass(frozen=True)
class Scrape:
    """What the config is made from: the workers by name, and the gateway's metrics URL.
    `ca_file`: the CA that signs the workers' certificates, when they serve TLS."""

    workers: dict[str, ServerReady]
    gateway_metrics_url: str | None = None
    ca_file: Path | None = None


def _target(url: str) -> tuple[str, str, str]:
    """(scheme, host:port, path) of a metrics URL."""
    parts = urlsplit(url)
    return parts.scheme, parts.netloc, parts.path or "/metrics"


def _job(name: str, urls: dict[str, str], scrape: Scrape, interval_s: float) -> dict[str, Any]:
    """One job: a static config per worker (its own labels), one scheme and path for all."""
    targets = {w: _target(u) for w, u in urls.items()}
    schemes = {scheme for scheme, _, _ in targets.values()}
    paths = {path for _, _, path in targets.values()}
    assert len(schemes) == 1 and len(paths) == 1, "a fleet's workers share TLS and paths"
    job: dict[str, Any] = {
        "job_name": name,
        "scrape_interval": f"{interval_s:g}s",
        "scrape_timeout": f"{min(interval_s, 10):g}s",
        "metrics_path": paths.pop(),
        "scheme": schemes.pop(),
    }
    if job["scheme"] == "https" and scrape.ca_file is not None:
        job["tls_config"] = {"ca_file": str(scrape.ca_file)}
    job["static_configs"] = []
    for worker, (_, address, _) in targets.items():
        labels = {"worker": worker}
        if worker in scrape.workers:
            r = scrape.workers[worker]
            labels |= {"hardware": r.hardware, "model": r.model, "role": r.role}
        job["static_configs"].append({"targets": [address], "labels": labels})
    return job


def scrape_config(scrape: Scrape, *, interval_s: float = 5.0) -> dict[str, Any]:
    """The config as data: `global` and the jobs that have targets."""
    metrics = {n: r.metrics_url for n, r in scrape.workers.items() if r.metrics_url}
    dcgm = {n: r.dcgm_url for n, r in scrape.workers.items() if r.dcgm_url}
    jobs = []
    if metrics:
        jobs.append(_job(WORKER_JOB, metrics, scrape, interval_s))
    if dcgm:
        jobs.append(_job(DCGM_JOB, dcgm, scrape, interval_s))
    if scrape.gateway_metrics_url:
        jobs.append(_job(GATEWAY_JOB, {"gateway": scrape.gateway_metrics_url}, scrape, interval_s))
    if not jobs:
        raise ConfigError(
            "no worker serves metrics: give the workers http_port or metrics_port "
            "(and dcgm_port for device telemetry)"
        )
    interval = f"{interval_s:g}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": jobs,
    }


def render(config: dict[str, Any], *, comment: str = "") -> str:
    """The config as YAML text, `comment` lines first."""
    return yamltext.dump(config, comment=comment)


def _skipped(scrape: Scrape) -> list[str]:
    out = []
    for name, r in scrape.workers.items():
        if r.metrics_url is None:
            out.append(f"{name}: no metrics port (give it http_port or metrics_port)")
        if r.tls and scrape.ca_file is None:
            out.append(f"{name}: serves TLS; add tls_config (ca_file) to its jobs")
    return out


def write(path: Path, scrape: Scrape, *, interval_s: float = 5.0, source: str = "") -> None:
    """Write the scrape config for `scrape` to `path`."""
    lines = [f"Prometheus scrape config for memorywall workers{f' ({source})' if source else ''}."]
    lines.append("Written by `memorywall fleet --prometheus-config`; the Grafana dashboard")
    lines.append("(`memorywall grafana-dashboard`) reads the worker and hardware labels.")
    lines += _skipped(scrape)
    text = render(scrape_config(scrape, interval_s=interval_s), comment="\n".join(lines))
    try:
        path.write_text(text)
    except OSError as e:
        raise ConfigError(f"--prometheus-config: cannot write {path} ({e})") from None


def from_ready_file(path: Path) -> Scrape:
    """A fleet's ready file (`memorywall fleet --ready-file`), or one server's
    (`memorywall serve --ready-file`: the worker is named by the file's stem)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the ready file ({e})") from None
    if isinstance(data, dict) and "workers" in data:
        # Imported here: the runner pulls in process management this module needs not.
        from memorywall.fleet.runner import FleetReady

        try:
            fleet = FleetReady.from_dict(data)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{path}: not a fleet ready file ({e})") from None
        gateway = fleet.gateway.metrics_url if fleet.gateway is not None else None
        return Scrape(fleet.workers, gateway)
    return Scrape({path.name.split(".")[0]: ServerReady.from_dict(data, str(path))})
