"""The emulated dcgm-exporter: its text format as dcgm-exporter writes it, per-device values
from the engine's steps, and over a real loopback load its energy counters growing by the
server's modelled energy."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from memorywall.core import load_hardware, load_model, plan_deployment
from memorywall.server.app import EmulatorServer, ServerConfig
from memorywall.server.engine.api import (
    EngineStats,
    LagSummary,
    PrefixCacheStats,
    StallSummary,
    StepReport,
)
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.fronts.dcgm import DcgmExporter, DeviceFacts
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc

TIMEOUT_S = 20.0
FIELDS = {
    "DCGM_FI_DEV_POWER_USAGE": "gauge",
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": "counter",
    "DCGM_FI_DEV_GPU_UTIL": "gauge",
    "DCGM_FI_DEV_FB_FREE": "gauge",
    "DCGM_FI_DEV_FB_USED": "gauge",
}
# A dcgm-exporter sample line: NAME{gpu="0",UUID="GPU-...",...} VALUE (no timestamp).
SAMPLE = re.compile(r'^(DCGM_FI_[A-Z_]+)\{((?:[A-Za-z_]+="[^"]*",?)+)\} (-?[0-9.]+)$')


def parse_dcgm(text: str) -> dict[str, dict[str, tuple[dict[str, str], float]]]:
    """dcgm-exporter's exposition, checked line by line: every family opens with `# HELP` then
    `# TYPE`, every sample carries labels; {field: {gpu: (labels, value)}}."""
    out: dict[str, dict[str, tuple[dict[str, str], float]]] = {}
    lines = text.splitlines()
    current = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert lines[i + 1].startswith(f"# TYPE {name} "), lines[i + 1]
            current = name
            out[name] = {}
            i += 2
            continue
        m = SAMPLE.match(line)
        assert m, f"not a dcgm-exporter sample line: {line!r}"
        assert m.group(1) == current, f"{m.group(1)} outside its family"
        labels = dict(re.findall(r'([A-Za-z_]+)="([^"]*)"', m.group(2)))
        out[current][labels["gpu"]] = (labels, float(m.group(3)))
        i += 1
    return out


def facts(devices: int = 2) -> DeviceFacts:
    return DeviceFacts(
        model_name="h100-sxm",
        devices=devices,
        static_w=280.0,
        capacity_bytes=80e9,
        weight_bytes=16e9,
        kv_bytes_per_token=131072.0,
    )


def stats(kv_used_tokens: int, busy: bool) -> EngineStats:
    return EngineStats(
        running=int(busy),
        waiting=0,
        kv_used_tokens=kv_used_tokens,
        kv_total_tokens=1_000_000,
        lag=LagSummary(0, 0.0, 0.0, 0.0, 0.0, 0, 0.01),
        host_stall=StallSummary(stalls=0, stalled_s=0.0, degraded=False, window_s=5.0),
        uptime_s=1.0,
        requests_finished=0,
        requests_aborted=0,
        tokens_generated=0,
        preemptions=0,
        steps=0,
        modelled_energy_j=0.0,
        draining=False,
        stream_interval_s=0.0,
        prefix_cache=PrefixCacheStats(),
    )


def step(time_s: float, energy_j: float, start_s: float = 0.0) -> StepReport:
    return StepReport(
        start_s=start_s,
        time_s=time_s,
        energy_j=energy_j,
        tokens=1,
        generated=1,
        preemptions_total=0,
        first_tokens=[],
        token_gaps=[],
    )


def test_text_format_is_dcgm_exporters_and_values_split_over_devices():
    clock = [100.0]
    exporter = DcgmExporter(facts(2), hostname="node-a", monotonic=lambda: clock[0])
    busy = [True]
    exporter.watch(lambda: stats(kv_used_tokens=8192, busy=busy[0]))
    for k in range(10):
        exporter.on_step(step(0.04, 28.0, start_s=99.6 + 0.04 * k))  # 700 W over both devices
    clock[0] += 0.05  # steps covered 0.4 s of the last second
    body, content_type = exporter.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    text = body.decode()
    fields = parse_dcgm(text)
    assert set(fields) == set(FIELDS)
    # prometheus_client's own parser reads it too, with dcgm-exporter's types.
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in FIELDS.items():
        assert families[name].type == kind
        assert len(families[name].samples) == 2
    for gpu in ("0", "1"):
        labels, _ = fields["DCGM_FI_DEV_POWER_USAGE"][gpu]
        assert labels["modelName"] == "h100-sxm"
        assert labels["Hostname"] == "node-a"
        assert labels["memorywall"] == "emulated"
        assert labels["UUID"].startswith("GPU-")
        assert fields["DCGM_FI_DEV_POWER_USAGE"][gpu][1] == pytest.approx(350.0)
        assert fields["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"][gpu][1] == 140_000  # mJ
        assert fields["DCGM_FI_DEV_GPU_UTIL"][gpu][1] == 40
        used = (16e9 + 8192 * 131072) / 2 / 2**20
        assert fields["DCGM_FI_DEV_FB_USED"][gpu][1] == round(used)
        assert fields["DCGM_FI_DEV_FB_FREE"][gpu][1] == round(80e9 / 2**20) - round(used)
    uuids = {fields["DCGM_FI_DEV_GPU_UTIL"][g][0]["UUID"] for g in ("0", "1")}
    assert len(uuids) == 2
    # Scraping again reads the same window: any number of scrapers agree.
    again = parse_dcgm(exporter.render()[0].decode())
    assert again["DCGM_FI_DEV_GPU_UTIL"]["0"][1] == 40
    # Idle: static power per device, and no step in the last second: 0 % busy.
    busy[0] = False
    clock[0] += 1.0
    fields = parse_dcgm(exporter.render()[0].decode())
    assert fields["DCGM_FI_DEV_POWER_USAGE"]["1"][1] == pytest.approx(280.0)
    assert fields["DCGM_FI_DEV_GPU_UTIL"]["1"][1] == 0


def test_clock_is_written_only_where_the_profile_has_one():
    text = DcgmExporter(facts(1), hostname="h").render()[0].decode()
    assert "DCGM_FI_DEV_SM_CLOCK" not in text
    clocked = DeviceFacts(**{**facts(1).__dict__, "sm_clock_mhz": 1980.0})
    fields = parse_dcgm(DcgmExporter(clocked, hostname="h").render()[0].decode())
    assert fields["DCGM_FI_DEV_SM_CLOCK"]["0"][1] == 1980


def test_the_wafer_is_one_device():
    wafer = plan_deployment(load_hardware("wse-3"), load_model("llama-3.1-8b"))
    fields = parse_dcgm(DcgmExporter.for_deployment(wafer, hostname="h").render()[0].decode())
    assert set(fields["DCGM_FI_DEV_POWER_USAGE"]) == {"0"}
    labels, power = fields["DCGM_FI_DEV_POWER_USAGE"]["0"]
    assert labels["modelName"] == "wse-3"
    assert power == pytest.approx(wafer.hardware.static_w)


def _family_total(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        if family.name == name or family.name == name.removesuffix("_total"):
            return sum(s.value for s in family.samples if s.name.endswith(("_total", name)))
    raise AssertionError(f"{name} not in the exposition")


async def _scrape(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as response:
        assert response.status == 200
        return await response.text()


@pytest.mark.parametrize(("hardware", "devices"), [("h100-sxm", 2), ("wse-3", 1)])
async def test_energy_counters_grow_by_the_modelled_energy_over_a_load(hardware, devices):
    deployment = plan_deployment(
        load_hardware(hardware), load_model("llama-3.1-8b"), devices=devices
    )
    server = EmulatorServer(
        deployment, EngineConfig(), ServerConfig(port=0, metrics_port=0, dcgm_port=0)
    )
    await server.start()
    try:
        assert server.dcgm_port and server.dcgm_port != server.metrics_port
        dcgm_url = f"http://127.0.0.1:{server.dcgm_port}/metrics"
        prom_url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        async with aiohttp.ClientSession() as session:
            before = parse_dcgm(await _scrape(session, dcgm_url))
            prom_before = _family_total(
                await _scrape(session, prom_url), "memorywall:modelled_energy_joules"
            )
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = engine_pb2_grpc.EngineStub(channel)

                async def one(i: int) -> None:
                    request = pb.GenerateRequest(
                        token_count=200 + 10 * i, max_tokens=40, ignore_eos=True
                    )
                    async for _ in stub.Generate(request):
                        pass

                await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(16))), TIMEOUT_S)
            after = parse_dcgm(await _scrape(session, dcgm_url))
            prom_after = _family_total(
                await _scrape(session, prom_url), "memorywall:modelled_energy_joules"
            )
    finally:
        await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)
    energy = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
    assert set(after[energy]) == {str(i) for i in range(devices)}
    grown_mj = sum(after[energy][g][1] - before[energy][g][1] for g in after[energy])
    modelled_j = prom_after - prom_before
    assert modelled_j > 0
    assert grown_mj / 1e3 == pytest.approx(modelled_j, rel=0.01)
    # Every device took its share: the core splits a step evenly over the deployment.
    shares = [after[energy][g][1] - before[energy][g][1] for g in after[energy]]
    assert max(shares) - min(shares) <= 1  # mJ, truncation
    for gpu in after["DCGM_FI_DEV_GPU_UTIL"]:
        assert 0 < after["DCGM_FI_DEV_GPU_UTIL"][gpu][1] <= 100
        assert after["DCGM_FI_DEV_FB_USED"][gpu][1] > 0
