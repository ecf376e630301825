"""What a column of the dashboard shows, from two scrapes of one worker.

Rates and recent quantiles come from the difference between the newest scrape and one a
window earlier, as Prometheus' `rate()` and `histogram_quantile()` over `increase()` would:
tokens/s over the host's clock (the emulator runs in real time), TTFT and ITL quantiles
over the requests and tokens of the window only (interpolated within vLLM's buckets, as
Prometheus does: the ITL's lowest bound is 10 ms, so a wafer's sub-millisecond gaps show in
the exact mean, not in a quantile). Gauges (batch, KV, power) are the newest
scrape's. A figure with no data in the window (no tokens, no first token) is None, never 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from memorywall.dashboard import scrape as m
from memorywall.dashboard.scrape import Histogram, Scrape


@dataclass(frozen=True)
class Figures:
    """One worker's live figures; SI units (seconds, watts, joules), rates per second."""

    tokens_per_s: float | None  # generated tokens, all users together
    tokens_per_s_per_device: float | None
    tokens_per_s_per_user: float | None  # a decoding user's pace: 1 / mean ITL
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    itl_mean_s: float | None  # exact (sum / count): vLLM's ITL buckets start at 10 ms
    itl_p50_s: float | None
    itl_p99_s: float | None
    running: float | None
    waiting: float | None
    kv_usage: float | None  # 0..1
    power_w: float | None
    rated_power_w: float | None
    energy_per_token_j: float | None  # modelled energy over generated tokens, in the window
    lag_p99_s: float | None  # how late token groups reached their streams (host clock)
    stall_share: float | None  # modelled time added by host stalls, per second
    degraded: bool | None
    finished_per_s: float | None

    def as_dict(self) -> dict[str, float | bool | None]:
        return asdict(self)


def _delta(new: Scrape, old: Scrape, name: str) -> float | None:
    a, b = new.value(name), old.value(name)
    if a is None or b is None:
        return None
    return a - b


def _window(new: Scrape, old: Scrape, name: str) -> Histogram | None:
    a, b = new.histograms.get(name), old.histograms.get(name)
    if a is None:
        return None
    return a if b is None else a.minus(b)


def _per(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def is_reset(new: Scrape, old: Scrape) -> bool:
    """True if a counter went backwards: the worker restarted between the two scrapes."""
    for name in (m.GENERATION_TOKENS, m.ENERGY_J, m.PROMPT_TOKENS):
        d = _delta(new, old, name)
        if d is not None and d < 0:
            return True
    return False


def figures(new: Scrape, old: Scrape | None, devices: int | None) -> Figures:
    """The figures between `old` and `new` (`old` None: gauges only, no rates yet)."""
    dt = new.at_s - old.at_s if old is not None else 0.0
    tokens = energy = stall = finished = None
    itl = ttft = lag = None
    if old is not None and dt > 0:  # rates need two scrapes apart in time
        tokens = _delta(new, old, m.GENERATION_TOKENS)
        energy = _delta(new, old, m.ENERGY_J)
        stall = _delta(new, old, m.HOST_STALL_S)
        finished = _delta(new, old, m.FINISHED)
        ttft = _window(new, old, m.TTFT)
        itl = _window(new, old, m.ITL)
        lag = _window(new, old, m.LAG)
    tokens_per_s = _per(tokens, dt)
    itl_mean = itl.mean() if itl is not None else None
    degraded = new.value(m.DEGRADED)
    return Figures(
        tokens_per_s=tokens_per_s,
        tokens_per_s_per_device=_per(tokens_per_s, devices),
        tokens_per_s_per_user=_per(1.0, itl_mean),
        ttft_p50_s=ttft.quantile(0.5) if ttft is not None else None,
        ttft_p99_s=ttft.quantile(0.99) if ttft is not None else None,
        itl_mean_s=itl_mean,
        itl_p50_s=itl.quantile(0.5) if itl is not None else None,
        itl_p99_s=itl.quantile(0.99) if itl is not None else None,
        running=new.value(m.RUNNING),
        waiting=new.value(m.WAITING),
        kv_usage=new.value(m.KV_USAGE),
        power_w=new.value(m.POWER_W),
        rated_power_w=new.value(m.RATED_POWER_W),
        energy_per_token_j=_per(energy, tokens),
        lag_p99_s=lag.quantile(0.99) if lag is not None else None,
        stall_share=_per(stall, dt),
        degraded=None if degraded is None else degraded > 0,
        finished_per_s=_per(finished, dt),
    )
