"""Output rates of one level result, as measured and as the core predicts them.

Both come from a level's result dict (`bench.summarise`): measured rates from vLLM's
`output_throughput` and `mean_tpot_ms`; predicted ones from the core's `predicted_tpot_ms`
and `predicted_e2el_ms` for the same load.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Rates:
    """Output tokens/s: what one user sees, and what the whole deployment delivers."""

    per_user: float | None
    total: float | None


def measured(r: dict) -> Rates:
    """Per user: 1 / mean TPOT, as the prediction is 1 / predicted TPOT (the mean of each
    request's own rate, `mean_output_tok_s_per_user`, runs high when tokens come in bursts)."""
    tpot = r.get("mean_tpot_ms")
    return Rates(per_user=1e3 / tpot if tpot else None, total=r.get("output_throughput"))


def predicted(r: dict) -> Rates:
    """Per user: 1 / predicted TPOT. Total, for a closed loop only: `max_concurrency` users,
    each receiving the mean output over the predicted request time (Little's law). An open
    loop's total is its arrival rate while the server keeps up, so no prediction is made."""
    tpot = r.get("predicted_tpot_ms")
    per_user = 1e3 / tpot if tpot else None
    total = None
    e2el, users = r.get("predicted_e2el_ms"), r.get("max_concurrency")
    closed_loop = r.get("request_rate") is None and r.get("level") != "trace"
    if e2el and users and closed_loop and r.get("completed"):
        output = r["total_output_tokens"] / r["completed"]
        total = users * output / (e2el / 1e3)
    return Rates(per_user=per_user, total=total)
