"""The plan's load searches several at once (a process pool, a Ray cluster), with the same
evaluations as the search in order.

In order, a candidate is settled without a search when those before it prune it (its
estimate under half the best goodput per device already reached on its backend) or
give the same runs (a batch limit above another's peak in flight); otherwise it is
searched. A search is a function of the query and the candidate alone, so it may run
early, anywhere; what order decides is only whether its result is used.

The wave rule: at any moment up to `pool.width` searches are in flight: those of the
first candidates, in estimate order, that are not yet evaluated, not already searched or
searching, and not already settled by the evaluations done so far (settled stays settled:
the best goodput only rises, a matching batch limit stays a match). Whenever a search
finishes, the candidates are evaluated in order as far as they can be (each settled, or
searched and its search finished), exactly as in order; then the wave is topped up. A
search started for a candidate that the evaluations before it later settle is wasted
work, never a different answer; the waste is bounded by the width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait

from memorywall.cluster.pools import Pool
from memorywall.plan.planner import (
    AnyCandidate,
    Evaluation,
    Query,
    Space,
    record,
    search,
    searched,
    settled,
)
from memorywall.plan.space import Estimate

__all__ = ["evaluate_in_waves"]


def evaluate_in_waves(
    query: Query,
    space: Space,
    scored: Sequence[tuple[AnyCandidate, Estimate]],
    pool: Pool,
    progress: Callable[[int, int], None] | None = None,
) -> list[Evaluation]:
    """`scored`'s evaluations, the ones `planner`'s in-order loop gives, searching on `pool`;
    `progress(evaluated, total)` each time a search finishes."""
    total = len(scored)
    best_on: dict[str, float] = {}
    evaluations: list[Evaluation] = []
    searches: dict[int, Future] = {}  # by position in `scored`

    def top_up() -> None:
        running = sum(1 for f in searches.values() if not f.done())
        for i in range(len(evaluations), total):
            if running >= pool.width:
                return
            c, est = scored[i]
            if i in searches or settled(c, est, best_on, evaluations) is not None:
                continue
            searches[i] = pool.submit(search, query, space, c, est)
            running += 1

    while len(evaluations) < total:
        i = len(evaluations)
        c, est = scored[i]
        ev = settled(c, est, best_on, evaluations)
        if ev is None:
            if i not in searches:  # first in line, whatever wasted searches still run
                searches[i] = pool.submit(search, query, space, c, est)
            task = searches[i]
            if not task.done():
                top_up()
                wait([f for f in searches.values() if not f.done()], return_when=FIRST_COMPLETED)
                if progress:
                    progress(len(evaluations), total)
                continue
            ev = searched(c, est, task.result())
        record(ev, best_on, evaluations)
        if progress:
            progress(len(evaluations), total)
    for task in searches.values():
        task.cancel()  # searches the evaluations settled after all (queued ones only)
    return evaluations
