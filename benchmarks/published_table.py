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
"""

from __future__ import annotations

from memorywall.core.calibration import load_published
from memorywall.core.published import PublishedComparison, published_comparisons

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


def table_line(c: PublishedComparison) -> str:
    name, _, _ = METRICS[c.metric]
    return (
        f"| {c.label} | {name} | {_fmt(c.published, c.metric)} "
        f"| {_fmt(c.predicted, c.metric)} | {c.error:+.1%} | {c.how} |"
    )


def markdown() -> str:
    rows = load_published()
    table = published_comparisons(rows)
    fit = [c for c in table.rows if c.fit]
    other = [c for c in table.rows if not c.fit]
    out = [
        "| row | compared | published | predicted | error | how predicted |",
        "|---|---|---|---|---|---|",
        *(table_line(c) for c in table.rows),
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
    print(markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
