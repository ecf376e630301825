"""The dashboard's figures and its JSON snapshot, from known /metrics texts.

Two scrapes of a worker, a second apart on a fake clock: the snapshot endpoint must give
the rates, recent quantiles and gauges that follow from their difference, and None (not 0)
for a figure with no data.
"""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer

from memorywall.dashboard.derive import figures
from memorywall.dashboard.poller import Poller, PollerConfig
from memorywall.dashboard.scrape import Histogram, ScrapeError, parse
from memorywall.dashboard.sources import LocalSource, Target
from memorywall.dashboard.web import dashboard_app

LABELS = 'model_name="llama-3.1-8b",engine="0"'


def metrics_text(
    *, tokens: float, energy_j: float, itl: tuple[float, float, float], ttft: tuple[float, float]
) -> str:
    """A worker's /metrics as the server writes it (the families the dashboard reads).
    `itl`: cumulative counts at le=0.01, 0.025 and +Inf; `ttft`: at le=0.1 and +Inf."""
    itl_sum = 0.005 * itl[0] + 0.02 * (itl[1] - itl[0])
    return f"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{{LABELS}}} 8.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{{LABELS}}} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{{LABELS}}} 0.25
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{{{LABELS}}} {tokens}
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{{{LABELS}}} 1000.0
# TYPE vllm:request_success counter
vllm:request_success_total{{{LABELS},finished_reason="length"}} {tokens / 100}
vllm:request_success_total{{{LABELS},finished_reason="stop"}} 0.0
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_bucket{{{LABELS},le="0.01"}} {itl[0]}
vllm:inter_token_latency_seconds_bucket{{{LABELS},le="0.025"}} {itl[1]}
vllm:inter_token_latency_seconds_bucket{{{LABELS},le="+Inf"}} {itl[2]}
vllm:inter_token_latency_seconds_count{{{LABELS}}} {itl[2]}
vllm:inter_token_latency_seconds_sum{{{LABELS}}} {itl_sum}
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{{LABELS},le="0.1"}} {ttft[0]}
vllm:time_to_first_token_seconds_bucket{{{LABELS},le="+Inf"}} {ttft[1]}
vllm:time_to_first_token_seconds_count{{{LABELS}}} {ttft[1]}
vllm:time_to_first_token_seconds_sum{{{LABELS}}} {0.05 * ttft[1]}
# TYPE memorywall:modelled_energy_joules counter
memorywall:modelled_energy_joules_total{{{LABELS}}} {energy_j}
# TYPE memorywall:modelled_power_watts gauge
memorywall:modelled_power_watts{{{LABELS}}} 650.5
# TYPE memorywall:rated_power_watts gauge
memorywall:rated_power_watts{{{LABELS}}} 700.0
# TYPE memorywall:degraded gauge
memorywall:degraded{{{LABELS}}} 0.0
# TYPE memorywall:host_stall_seconds counter
memorywall:host_stall_seconds_total{{{LABELS}}} 0.0
"""


FIRST = metrics_text(tokens=1000.0, energy_j=50.0, itl=(100, 100, 100), ttft=(10, 10))
# One second later: 400 more tokens, 2 J more, 400 more gaps (300 at <= 10 ms, 100 in
# (10, 25] ms), 4 more first tokens, all within 100 ms.
SECOND = metrics_text(tokens=1400.0, energy_j=52.0, itl=(400, 500, 500), ttft=(14, 14))


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


class Texts:
    """The worker's /metrics, one body per read."""

    def __init__(self, *bodies: str) -> None:
        self.bodies = list(bodies)

    def __call__(self) -> str:
        return self.bodies.pop(0)


def worker(*bodies: str) -> LocalSource:
    target = Target(name="gpu", hardware="h100-sxm", model="llama-3.1-8b", devices=2)
    return LocalSource(target, Texts(*bodies))


async def two_scrapes(clock: Clock, *bodies: str) -> Poller:
    poller = Poller([worker(*bodies)], PollerConfig(interval_s=1.0, window_s=5.0), clock=clock)
    await poller.poll_once()
    clock.now_s += 1.0
    await poller.poll_once()
    return poller


async def test_snapshot_endpoint_gives_the_figures_of_the_window():
    clock = Clock()
    poller = await two_scrapes(clock, FIRST, SECOND)
    async with TestClient(TestServer(dashboard_app(poller, poll=False))) as client:
        response = await client.get("/api/snapshot")
        assert response.status == 200
        snap = await response.json()
    assert (snap["interval_s"], snap["window_s"]) == (1.0, 5.0)
    [w] = snap["workers"]
    assert (w["name"], w["hardware"], w["devices"], w["up"], w["polls"]) == (
        "gpu",
        "h100-sxm",
        2,
        True,
        2,
    )
    f = w["figures"]
    assert f["tokens_per_s"] == pytest.approx(400.0)
    assert f["tokens_per_s_per_device"] == pytest.approx(200.0)
    # 400 gaps in the window: 300 of 5 ms and 100 of 20 ms, 3.5 s in all.
    assert f["tokens_per_s_per_user"] == pytest.approx(400 / (300 * 0.005 + 100 * 0.02))
    assert f["itl_mean_s"] == pytest.approx((300 * 0.005 + 100 * 0.02) / 400)
    assert f["itl_p50_s"] == pytest.approx(0.01 * 200 / 300)  # linear in (0, 10 ms]
    assert f["itl_p99_s"] == pytest.approx(0.01 + 0.015 * (396 - 300) / 100)
    assert f["ttft_p50_s"] == pytest.approx(0.05)  # 4 first tokens, all in (0, 100 ms]
    assert f["energy_per_token_j"] == pytest.approx(2.0 / 400)
    assert f["finished_per_s"] == pytest.approx(4.0)
    assert (f["running"], f["waiting"], f["kv_usage"]) == (8.0, 2.0, 0.25)
    assert (f["power_w"], f["rated_power_w"]) == (650.5, 700.0)
    assert (f["degraded"], f["stall_share"]) == (False, 0.0)
    assert f["lag_p99_s"] is None  # the text has no lag histogram
    history = w["history"]
    assert history["age_s"] == [1.0, 0.0]
    assert history["tokens_per_s"] == [None, pytest.approx(400.0)]


async def test_first_scrape_has_gauges_and_no_rates():
    poller = Poller([worker(FIRST)], clock=Clock())
    await poller.poll_once()
    f = poller.snapshot()["workers"][0]["figures"]
    assert f["running"] == 8.0
    assert f["tokens_per_s"] is None
    assert f["ttft_p50_s"] is None
    assert f["energy_per_token_j"] is None


async def test_no_tokens_in_the_window_is_no_data_not_zero():
    clock = Clock()
    poller = await two_scrapes(clock, FIRST, FIRST)
    f = poller.snapshot()["workers"][0]["figures"]
    assert f["tokens_per_s"] == 0.0
    assert f["tokens_per_s_per_user"] is None
    assert f["itl_p50_s"] is None
    assert f["itl_mean_s"] is None
    assert f["energy_per_token_j"] is None


async def test_a_restarted_worker_starts_its_window_again():
    clock = Clock()
    poller = await two_scrapes(clock, SECOND, FIRST)  # counters went backwards
    f = poller.snapshot()["workers"][0]["figures"]
    assert f["tokens_per_s"] is None


async def test_the_window_drops_older_scrapes():
    clock = Clock()
    bodies = [
        metrics_text(tokens=1000.0 + 100 * i, energy_j=50.0, itl=(1, 1, 1), ttft=(1, 1))
        for i in range(10)
    ]
    poller = Poller(
        [worker(*bodies)], PollerConfig(interval_s=1.0, window_s=3.0, history=4), clock=clock
    )
    for _ in bodies:
        await poller.poll_once()
        clock.now_s += 1.0
    w = poller.snapshot()["workers"][0]
    assert w["figures"]["tokens_per_s"] == pytest.approx(100.0)
    assert len(w["history"]["age_s"]) == 4


async def test_a_worker_that_fails_says_why_and_the_others_go_on():
    def broken() -> str:
        raise OSError("connection refused")

    down = LocalSource(Target(name="down"), broken)
    poller = Poller([down, worker(FIRST)], clock=Clock())
    await poller.poll_once()
    snap = poller.snapshot()["workers"]
    assert (snap[0]["up"], snap[0]["error"], snap[0]["figures"]) == (
        False,
        "connection refused",
        None,
    )
    assert snap[1]["up"] is True


async def test_a_worker_that_raises_anything_shows_it_and_the_poller_goes_on():
    def broken() -> str:
        raise RuntimeError("render failed")

    poller = Poller([LocalSource(Target(name="odd"), broken), worker(FIRST, SECOND)], clock=Clock())
    await poller.poll_once()
    await poller.poll_once()
    snap = poller.snapshot()["workers"]
    assert (snap[0]["up"], snap[0]["error"]) == (False, "render failed")
    assert snap[1]["polls"] == 2


async def test_a_body_that_is_not_prometheus_text_is_an_error():
    poller = Poller([worker("this is not {metrics")], clock=Clock())
    await poller.poll_once()
    w = poller.snapshot()["workers"][0]
    assert w["up"] is False
    assert w["error"].startswith("not Prometheus text")


def test_parse_refuses_garbage():
    with pytest.raises(ScrapeError):
        parse("vllm:x{ 1", 0.0)


@pytest.mark.parametrize(
    ("q", "expected"),
    [(0.0, 0.0), (0.25, 0.05), (0.5, 0.1), (0.75, 0.3), (1.0, 0.5)],
)
def test_quantile_interpolates_within_buckets_as_prometheus(q, expected):
    h = Histogram(bounds=(0.1, 0.5, float("inf")), counts=(2.0, 4.0, 4.0), sum=0.0)
    assert h.quantile(q) == pytest.approx(expected)


def test_quantile_in_the_inf_bucket_is_the_largest_bound():
    h = Histogram(bounds=(0.1, float("inf")), counts=(1.0, 10.0), sum=0.0)
    assert h.quantile(0.99) == 0.1
    assert Histogram(bounds=(0.1, float("inf")), counts=(0.0, 0.0), sum=0.0).quantile(0.5) is None


def test_figures_per_device_needs_the_device_count():
    first, second = parse(FIRST, 0.0), parse(SECOND, 1.0)
    assert figures(second, first, None).tokens_per_s_per_device is None
    assert figures(second, first, 4).tokens_per_s_per_device == pytest.approx(100.0)


async def test_the_page_and_its_assets_are_served():
    poller = Poller([worker(FIRST)], clock=Clock())
    async with TestClient(TestServer(dashboard_app(poller, poll=False))) as client:
        page = await client.get("/")
        assert page.status == 200
        assert page.content_type == "text/html"
        html = await page.text()
        assert 'src="dashboard.js"' in html
        assert 'href="dashboard.css"' in html
        script = await client.get("/dashboard.js")
        assert script.content_type == "text/javascript"
        assert "api/snapshot" in await script.text()
        assert (await client.get("/dashboard.css")).status == 200
