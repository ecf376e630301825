"""Every published serving result against the core's prediction of it, as Markdown.

    python benchmarks/published_table.py

One line per row of core/calibration/published.toml (itself one entry per number in
docs/sources/published-results.md), then the assumptions each row makes. How each
metric is predicted (memorywall.core.calibration.PREDICTORS):

- per-user tok/s: tokens per decode step / decode step at batch 1, context
  prompt + output / 2 (or the row's `context`); speculative rows use one shared
  assumption (Llama 3.1 8B draft on the same devices, 4 drafts, acceptance 0.8).
- ITL: decode step / tokens per step at batch = concurrency.
- TTFT: prefill of the prompt; at concurrency n, (n + 1) / 2 x prefill, the mean
  wait of n prompts arriving together and prefilled one after another.
- aggregate tok/s: B x O / (prefill of B prompts + O x decode step), B = concurrency
  or, for max-throughput rows, min(max_batch, KV tokens // (prompt + output)).
- tok/s per device: aggregate / devices.

Rows with `fit = true` set the wafer's latency constants: ~0% error by construction.
Nothing here is tuned to shrink an error.

Rows measured under load (concurrency > 1) are also run on the serving engine
itself, offline (`memorywall.sim.simulate`): a closed loop of that many users on
the row's deployment, so queueing for KV space and prefills sharing steps with
decodes come from the engine's own schedule, not from a formula. `--no-simulate`
leaves that column out.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cache

from memorywall.core.calibration import load_published
from memorywall.core.published import (
    PublishedComparison,
    published_comparisons,
    published_deployment,
)

# The offline engine's run of a loaded row: TensorRT-LLM's defaults (max_num_tokens
# 8192, max batch 256), random prompts (no prefix sharing), enough requests per user
# that the start-up burst is a small share of the mean.
SIM_REQUESTS_PER_USER = 10
SIM_MAX_NUM_SEQS = 256
SIM_TOKEN_BUDGET = 8192


@dataclass(frozen=True)
class Simulated:
    """A loaded row's metrics from the offline engine (seconds, tok/s)."""

    ttft_s: float
    itl_s: float
    aggregate_tokens_per_s: float
    requests: int

    def value(self, metric: str) -> float | None:
        return {
            "ttft_s": self.ttft_s,
            "itl_s": self.itl_s,
            "aggregate_tokens_per_s": self.aggregate_tokens_per_s,
        }.get(metric)


@cache
def _simulate_load(key: tuple) -> Simulated:
    from memorywall.loadgen.bench import BenchConfig, Level
    from memorywall.loadgen.workload import Fixed, SyntheticWorkload
    from memorywall.server.engine.scheduler import EngineConfig
    from memorywall.sim.simulate import simulate_level

    row = dict(key)
    users = row["concurrency"]
    config = BenchConfig(
        target="offline",
        workload=SyntheticWorkload(Fixed(row["prompt"]), Fixed(row["output"])),
        num_prompts=users * SIM_REQUESTS_PER_USER,
        concurrency=(users,),
        label="published",
    )
    engine = EngineConfig(
        max_num_seqs=SIM_MAX_NUM_SEQS,
        max_num_batched_tokens=SIM_TOKEN_BUDGET,
        enable_prefix_caching=False,
    )
    run = simulate_level(published_deployment(row), engine, config, Level(f"c{users}", users, None))
    r = run.result
    return Simulated(
        ttft_s=r["mean_ttft_ms"] / 1e3,
        itl_s=r["mean_tpot_ms"] / 1e3,
        aggregate_tokens_per_s=r["output_throughput"],
        requests=r["completed"],
    )


def simulated(row: dict) -> Simulated | None:
    """The offline engine's metrics for a row measured under load; None for other rows."""
    if row.get("concurrency", 1) <= 1 or "prompt" not in row:
        return None
    keys = ("hardware", "model", "devices", "weight_precision", "kv_precision", "kernels")
    key = tuple((k, row[k]) for k in (*keys, "concurrency", "prompt", "output") if k in row)
    return _simulate_load(key)


# Display name and unit of each metric; values are SI (seconds, tok/s) until printed.
METRICS = {
    "tokens_per_s_per_user": ("per-user tok/s", 1.0, "tok/s"),
    "itl_s": ("ITL", 1e3, "ms"),
    "ttft_s": ("TTFT", 1e3, "ms"),
    "aggregate_tokens_per_s": ("aggregate tok/s", 1.0, "tok/s"),
    "tokens_per_s_per_device": ("tok/s per GPU", 1.0, "tok/s"),
}


def _fmt(value: float, metric: str) -> str:
    _, scale, unit = METRICS[metric]
    v = value * scale
    return f"{v:,.1f} {unit}" if v < 100 else f"{v:,.0f} {unit}"


def table_line(c: PublishedComparison, sim: Simulated | None = None) -> str:
    name, _, _ = METRICS[c.metric]
    line = (
        f"| {c.label} | {name} | {_fmt(c.published, c.metric)} "
        f"| {_fmt(c.predicted, c.metric)} | {c.error:+.1%} | {c.how} |"
    )
    if sim is None or (value := sim.value(c.metric)) is None:
        return line + " - |"
    return line + (
        f" {_fmt(value, c.metric)} ({value / c.published - 1:+.1%}), "
        f"closed loop of {sim.requests} requests |"
    )


def markdown(simulate: bool = True) -> str:
    rows = load_published()
    table = published_comparisons(rows)
    fit = [c for c in table.rows if c.fit]
    other = [c for c in table.rows if not c.fit]
    sims = [simulated(r) if simulate else None for r in rows]
    out = [
        "| row | compared | published | predicted | error | how predicted | offline engine |",
        "|---|---|---|---|---|---|---|",
        *(table_line(c, sim) for c, sim in zip(table.rows, sims, strict=True)),
        "",
        f"Rows used in the fit: {len(fit)}, max |error| {max(abs(c.error) for c in fit):.1e}.",
        f"Rows not used in any fit: {len(other)}, median |error| "
        f"{sorted(abs(c.error) for c in other)[len(other) // 2]:.0%}, "
        f"max |error| {max(abs(c.error) for c in other):.0%}.",
        "",
        "Assumptions per row (published.toml `note`; source grade in `source`):",
        "",
    ]
    out += [f"- {r['label']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(out)


def main() -> int:
    print(markdown(simulate="--no-simulate" not in sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
