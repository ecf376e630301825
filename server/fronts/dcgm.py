"""An emulated NVIDIA dcgm-exporter: per-device power, energy, utilisation and memory.

Served on `serve --dcgm-port` at `/metrics`, in the text format dcgm-exporter
writes (its `# HELP` strings, types and label names: `gpu`, `UUID`, `device`,
`modelName`, `Hostname`), so Grafana's DCGM dashboards, Kubernetes autoscalers
and AIPerf's `--gpu-telemetry` read an emulated wafer or GPU as a real one.
Every series also carries `memorywall="emulated"`, so nobody mistakes it for
hardware.

The numbers come from the engine's observer seam, as `fronts/metrics.py`'s do:
each step's modelled energy and time. The core models a step over the whole
deployment (dynamic energy of bytes moved plus static power of every device,
tensor and pipeline splits even), so each device gets an equal share of it:
the energy counters of all devices add up to `memorywall:modelled_energy_joules`.
Power is the last step's energy over its time while the engine has work and the
static power when idle (as `memorywall:modelled_power_watts`), per device.
Utilisation is the share of the last second that steps covered (per 0.1 s
bucket, by each step's modelled end, so any number of scrapers read the same).
Framebuffer use is the resident weights plus the KV held, per device, against
the device's resident memory. No profile gives a clock, so no SM clock series
is written (dcgm-exporter too leaves out fields a device does not report).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memorywall.server.engine.api import EngineStats, Finished, StepReport

if TYPE_CHECKING:
    from memorywall.core import Deployment

# dcgm-exporter serves the Prometheus text format 0.0.4 (Go's promhttp default).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MIB = 2**20
# Utilisation: busy time over the last WINDOW_S, kept in buckets of WINDOW_S / BUCKETS.
WINDOW_S = 1.0
BUCKETS = 10
# A fixed namespace: a device's UUID is a function of the host, the process and its index.
_UUID_NAMESPACE = uuid.UUID("6d656d6f-7279-7761-6c6c-000000000000")


@dataclass(frozen=True)
class DcgmField:
    """One dcgm-exporter series: its name, type and help as dcgm-exporter's
    default-counters.csv gives them."""

    name: str
    kind: str
    help: str


POWER = DcgmField("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).")
ENERGY = DcgmField(
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    "counter",
    "Total energy consumption since boot (in mJ).",
)
UTIL = DcgmField("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).")
FB_FREE = DcgmField("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).")
FB_USED = DcgmField("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).")
SM_CLOCK = DcgmField("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).")


@dataclass(frozen=True)
class DeviceFacts:
    """What the exporter needs of a deployment: its devices and their memory."""

    model_name: str  # the hardware profile's name (dcgm-exporter's `modelName`)
    devices: int
    static_w: float  # per device
    capacity_bytes: float  # resident memory per device
    weight_bytes: float  # resident weights over all devices
    kv_bytes_per_token: float  # over all devices
    sm_clock_mhz: float | None = None  # None: the profile gives no clock

    @classmethod
    def of(cls, deployment: Deployment) -> DeviceFacts:
        hw = deployment.hardware
        return cls(
            model_name=hw.name,
            devices=deployment.devices,
            static_w=hw.static_w,
            capacity_bytes=hw.resident.capacity_bytes,
            weight_bytes=deployment.resident_weight_bytes,
            kv_bytes_per_token=deployment.kv_bytes_per_token,
        )


class DcgmExporter:
    """An `EngineObserver` that serves what dcgm-exporter would for the modelled devices.

    `on_step` adds to a few numbers (steps come every ~0.5 ms on a wafer); the text
    is built when scraped (`render`), on the engine's loop like the hooks.
    `monotonic`: the engine's clock, read when scraped for the utilisation window (the
    live engine's is CLOCK_MONOTONIC; tests pass a fake).
    """

    def __init__(
        self,
        facts: DeviceFacts,
        *,
        hostname: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.facts = facts
        self._monotonic = monotonic
        self._stats: Callable[[], EngineStats] | None = None
        self._energy_j = 0.0  # over all devices
        self._last_power_w: float | None = None  # over all devices
        self._bucket_s = WINDOW_S / BUCKETS
        self._busy = [0.0] * BUCKETS  # busy seconds of the steps that ended in each bucket
        self._bucket_ids = [-1] * BUCKETS  # which bucket (time // bucket_s) each slot holds
        host = hostname or socket.gethostname()
        self._labels = [self._label_text(i, host) for i in range(facts.devices)]

    @classmethod
    def for_deployment(cls, deployment: Deployment, **kwargs) -> DcgmExporter:
        return cls(DeviceFacts.of(deployment), **kwargs)

    def _label_text(self, index: int, host: str) -> str:
        device_uuid = uuid.uuid5(_UUID_NAMESPACE, f"{host}/{os.getpid()}/{index}")
        labels = {
            "gpu": str(index),
            "UUID": f"GPU-{device_uuid}",
            "device": f"memorywall{index}",
            "modelName": self.facts.model_name,
            "Hostname": host,
            "memorywall": "emulated",
        }
        return ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())

    # EngineObserver

    def watch(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def on_step(self, step: StepReport) -> None:
        self._energy_j += step.energy_j
        if step.time_s > 0:
            self._last_power_w = step.energy_j / step.time_s
        bucket = int((step.start_s + step.time_s) // self._bucket_s)
        slot = bucket % BUCKETS
        if self._bucket_ids[slot] != bucket:
            self._bucket_ids[slot] = bucket
            self._busy[slot] = 0.0
        self._busy[slot] += step.time_s

    def on_finish(self, finished: Finished) -> None:
        pass

    def on_lag(self, lag_s: float) -> None:
        pass

    # Exposition

    @property
    def energy_j(self) -> float:
        """Modelled energy so far, all devices together."""
        return self._energy_j

    def utilisation(self) -> float:
        """Percent of the last `WINDOW_S` that steps covered (0 to 100)."""
        current = int(self._monotonic() // self._bucket_s)
        busy = sum(
            b
            for b, bucket in zip(self._busy, self._bucket_ids, strict=True)
            if current - BUCKETS < bucket <= current
        )
        return min(busy / WINDOW_S, 1.0) * 100.0

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its Content-Type, for a `/metrics` handler."""
        f = self.facts
        n = f.devices
        power_w = f.static_w * n
        kv_used_tokens = 0
        if self._stats is not None:
            s = self._stats()
            kv_used_tokens = s.kv_used_tokens
            if s.busy and self._last_power_w is not None:
                power_w = self._last_power_w
        used_bytes = (f.weight_bytes + kv_used_tokens * f.kv_bytes_per_token) / n
        used_mib = round(used_bytes / _MIB)
        free_mib = max(round(f.capacity_bytes / _MIB) - used_mib, 0)
        util = round(self.utilisation())
        energy_mj = self._energy_j * 1e3 / n
        lines: list[str] = []
        values: list[tuple[DcgmField, str]] = []
        if f.sm_clock_mhz is not None:
            values.append((SM_CLOCK, _int(f.sm_clock_mhz)))
        values += [
            (POWER, f"{power_w / n:f}"),
            (ENERGY, _int(energy_mj)),
            (UTIL, str(util)),
            (FB_FREE, str(free_mib)),
            (FB_USED, str(used_mib)),
        ]
        for field, value in values:
            lines.append(f"# HELP {field.name} {field.help}")
            lines.append(f"# TYPE {field.name} {field.kind}")
            lines.extend(f"{field.name}{{{labels}}} {value}" for labels in self._labels)
        return ("\n".join(lines) + "\n").encode(), CONTENT_TYPE


def _int(value: float) -> str:
    """dcgm-exporter writes integer fields (energy in mJ, clocks, MiB) without a fraction."""
    return str(int(value))


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
