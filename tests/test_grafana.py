"""The Grafana dashboard: its shape, its copy in docs/, the CLI, the PromQL reader, and every
metric name it queries checked against what a live worker and its DCGM port serve."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import grpc
import pytest

from memorywall.cli import main
from memorywall.core import load_hardware, load_model, plan_deployment
from memorywall.server.app import EmulatorServer, ServerConfig
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.telemetry import grafana
from memorywall.telemetry.promql import MetricUse, exposed, metric_uses
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
DOCS_COPY = ROOT / "docs" / "grafana" / "memorywall.json"
TIMEOUT_S = 30.0


def _names(expr: str) -> list[str]:
    return [u.name for u in metric_uses(expr)]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", ["up"]),
        ('x{a="}", b=~"$v"}', ["x"]),
        ("rate(x_total[5m])", ["x_total"]),
        ('sum by (le, worker) (rate(h_bucket{w=~"$w"}[$__rate_interval]))', ["h_bucket"]),
        ("sum(rate(a[1m])) without (instance) / on(job) group_left(model) b", ["a", "b"]),
        ("a > bool 1e3 and b offset 1h30m or c unless d", ["a", "b", "c", "d"]),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', ["m"]),
        ('count_values("v", gauge) * 0x10 + .5', ["gauge"]),
        (
            "histogram_quantile(0.99, sum by (le) (rate(ns:lag_seconds_bucket[5m])))",
            ["ns:lag_seconds_bucket"],
        ),
        ("topk(3, sum by (job) (x)) - max(y @ start())", ["x", "y"]),
        ("vector(1) + time() - Inf + NaN", []),
        ('rate({__name__="a_total", job="j"}[1m]) / b{__name__="ignored"}', ["a_total", "b"]),
    ],
)
def test_promql_metric_names(expr, names):
    assert _names(expr) == names


def test_promql_tells_the_functions_around_a_name():
    uses = metric_uses("histogram_quantile(0.5, sum by (le) (rate(h_bucket[1m]))) / (g)")
    assert uses == [
        MetricUse("h_bucket", ("rate", "sum", "histogram_quantile")),
        MetricUse("g", ()),
    ]


def test_exposed_keeps_sample_names_as_prometheus_stores_them():
    text = """# HELP h A histogram.
# TYPE h histogram
h_bucket{le="1.0"} 1.0
h_bucket{le="+Inf"} 2.0
h_count 2.0
h_sum 1.5
# TYPE c counter
c_total{a="b"} 3.0
# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0"} 12
# TYPE g gauge
g 1
g_total 2
loose 4
"""
    assert exposed(text) == {
        "h_bucket": "histogram",
        "h_count": "histogram",
        "h_sum": "histogram",
        "c_total": "counter",
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": "counter",
        "g": "gauge",
        "g_total": "untyped",  # a gauge takes no _total
        "loose": "untyped",
    }


def test_docs_copy_is_the_generated_dashboard():
    """docs/grafana/memorywall.json is what `memorywall grafana-dashboard` prints; refresh it
    with `memorywall grafana-dashboard -o docs/grafana/memorywall.json`."""
    assert DOCS_COPY.read_text() == grafana.render()


def test_dashboard_is_an_exported_dashboard_with_a_datasource_input():
    board = json.loads(grafana.render())
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    source = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == source and p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        for t in p["targets"]:
            assert t["datasource"] == source and _names(t["expr"]), t["expr"]
    for variable in board["templating"]["list"]:
        assert variable["datasource"] == source and variable["allValue"] == ".*"
    titles = {p["title"] for p in panels}
    for wanted in ("Time to first token", "Inter-token latency", "Batch", "KV cache usage",
                   "Power per device", "Energy per output token", "Wafer vs GPU",
                   "Tokens per joule", "Emulation lag"):  # fmt: skip
        assert wanted in titles
    exprs = grafana.expressions(board)
    assert any("histogram_quantile" in e and "_bucket" in e for e in exprs)
    assert any("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION" in e and "generation_tokens" in e
               for e in exprs)  # fmt: skip


def test_cli_prints_the_dashboard_or_writes_it(tmp_path, capsys):
    assert main(["grafana-dashboard"]) == 0
    assert capsys.readouterr().out == grafana.render()
    out = tmp_path / "board.json"
    assert main(["grafana-dashboard", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["uid"] == "memorywall"
    assert main(["grafana-dashboard", "-o", str(tmp_path / "missing" / "board.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memorywall: error: --output: ") and err.count("\n") == 1


async def _scrape(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as response:
        assert response.status == 200
        return await response.text()


def _check_use(use: MetricUse, served: dict[str, str], expr: str) -> None:
    """The name is a sample the server writes, of a family whose type fits its use."""
    assert use.name in served, f"{use.name} (in {expr}) is not served"
    kind = served[use.name]
    if use.name.endswith("_bucket"):
        assert kind == "histogram", f"{use.name}: _bucket of a {kind}"
    if use.functions and use.functions[0] in ("rate", "increase", "irate"):
        assert kind in ("counter", "histogram"), f"{use.functions[0]} over a {kind}: {expr}"
        if kind == "histogram":
            assert use.name.endswith(("_bucket", "_sum", "_count")), use.name


async def test_every_metric_name_in_the_dashboard_is_served_by_a_live_worker():
    deployment = plan_deployment(load_hardware("h100-sxm"), load_model("llama-3.1-8b"))
    server = EmulatorServer(
        deployment, EngineConfig(), ServerConfig(port=0, http_port=0, dcgm_port=0)
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = engine_pb2_grpc.EngineStub(channel)

            async def one(i: int) -> None:
                request = pb.GenerateRequest(token_count=100 + i, max_tokens=8, ignore_eos=True)
                async for _ in stub.Generate(request):
                    pass

            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(4))), TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as s:
            worker = exposed(await _scrape(s, f"http://127.0.0.1:{server.http_port}/metrics"))
            dcgm = exposed(await _scrape(s, f"http://127.0.0.1:{server.dcgm_port}/metrics"))
    finally:
        await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)
    served = {**worker, **dcgm}
    used: set[str] = set()
    for expr in grafana.expressions(grafana.dashboard()):
        for use in metric_uses(expr):
            _check_use(use, served, expr)
            used.add(use.name)
    # Both sources are read: the server's own series and the emulated exporter's.
    assert used & set(worker) and used & set(dcgm)
