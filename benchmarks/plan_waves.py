"""What `plan --jobs N` / `plan --ray` could gain on N free cores, from measured search costs.

    python -m benchmarks.plan_waves                       # the README's 8B query, widths 1-16
    python -m benchmarks.plan_waves --widths 2,4 --json

Runs each load search the waves ask for once, in this process, timing its CPU (user +
system: the code's own cost, what a free core would take), then replays the wave rule
(`memorywall.plan.waves`) on a virtual clock for each width: a search submitted at
virtual time t finishes at t + its CPU time, and the waves wait for the earliest to
finish. The plan each width gives is checked against the in-order one. The makespan
against the in-order total is the speedup N free cores would give, pool overheads (a
process's start and imports, ~1 s each, once per worker) aside; a shared host gives less.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from memorywall.argtypes import number_list
from memorywall.core import load_hardware, load_model
from memorywall.loadgen.slo import Slo
from memorywall.loadgen.workload import Fixed, SyntheticWorkload
from memorywall.plan import planner, waves
from memorywall.plan.planner import Query, Space
from memorywall.plan.report import as_json

WIDTHS = (1, 2, 4, 8, 16)


class _VirtualPool:
    """Runs each search at once (cached, its CPU time measured) and finishes its future
    only when `wait` reaches its virtual finish time."""

    def __init__(self, width: int, cache: dict[str, tuple[Any, float]]) -> None:
        self.width, self.now = width, 0.0
        self._cache = cache
        self._finish: dict[Future, tuple[float, Any]] = {}
        self.cpu_s = 0.0  # of every search submitted, wasted ones included

    def submit(self, fn: Any, /, *args: Any) -> Future:
        key = args[2].describe()  # each width's plan builds its candidates anew
        if key not in self._cache:
            cpu0 = time.process_time()
            self._cache[key] = (fn(*args), time.process_time() - cpu0)
        trials, cpu_s = self._cache[key]
        self.cpu_s += cpu_s
        future: Future = Future()
        self._finish[future] = (self.now + cpu_s, trials)
        return future

    def wait(self, futures: Sequence[Future], return_when: str) -> None:
        """`concurrent.futures.wait` on the virtual clock: the earliest to finish does."""
        future = min(futures, key=lambda f: self._finish[f][0])
        self.now, trials = self._finish.pop(future)
        future.set_result(trials)


def readme_query() -> tuple[Query, Space]:
    """The README's `plan` example: 8B on wse-3, h100-sxm and b200, TTFT 500 ms, TPOT 25 ms."""
    query = Query(
        model=load_model("llama-3.1-8b"),
        workload=SyntheticWorkload(Fixed(512), Fixed(128)),
        slo=Slo(ttft_s=0.5, tpot_s=0.025),
    )
    return query, Space(hardware=tuple(load_hardware(h) for h in ("wse-3", "h100-sxm", "b200")))


def run(widths: Sequence[int], reference: dict | None = None) -> dict:
    """Each width's virtual makespan; `reference`, a `plan --json` document of the same
    query, is checked against width 1's plan."""
    query, space = readme_query()
    cache: dict[str, tuple[Any, float]] = {}
    in_order: dict | None = None
    rows = []
    for width in sorted(widths):
        pool = _VirtualPool(width, cache)
        original = waves.wait
        waves.wait = pool.wait  # type: ignore[assignment]  # the virtual clock's
        try:
            doc = json.loads(json.dumps(as_json(planner.plan(query, space, pool=pool))))
        finally:
            waves.wait = original
        if in_order is None:  # width 1: the in-order search's own searches, in its order
            in_order = doc
        rows.append(
            {
                "width": width,
                "makespan_s": pool.now,
                "searches_cpu_s": pool.cpu_s,
                "same_plan": doc == in_order,
            }
        )
    if reference is not None and reference != in_order:
        raise SystemExit("width 1's plan differs from the reference document")
    base = rows[0]["makespan_s"] if rows and rows[0]["width"] == 1 else None
    for r in rows:
        r["speedup"] = base / r["makespan_s"] if base else None
    return {"query": "llama-3.1-8b wse-3,h100-sxm,b200 ttft=500ms tpot=25ms", "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=number_list(int, low=1), default=WIDTHS)
    p.add_argument("--json", action="store_true")
    p.add_argument("--reference", help="a `memorywall plan ... --json` output to check against")
    args = p.parse_args(argv)
    widths = sorted(set(args.widths) | {1})  # width 1 is the in-order search: the baseline
    reference = json.loads(Path(args.reference).read_text()) if args.reference else None
    report = run(widths, reference)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(report["query"])
    print("width  makespan s  speedup  searches CPU s  same plan")
    for r in report["rows"]:
        print(
            f"{r['width']:>5}  {r['makespan_s']:>10.1f}  {r['speedup']:>7.2f}  "
            f"{r['searches_cpu_s']:>14.1f}  {r['same_plan']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
