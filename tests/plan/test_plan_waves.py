"""`memorywall.plan.waves`: load searches several at once give the plan the in-order
search gives, pruning and reuse included; and `plan --jobs` from the command line."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest

from memorywall.cli import main
from memorywall.core import Precision, load_hardware, load_model
from memorywall.loadgen.slo import Slo
from memorywall.loadgen.workload import Fixed, SyntheticWorkload
from memorywall.plan import planner, waves
from memorywall.plan.planner import LoadKind, Query, Space, Status, plan
from memorywall.plan.report import as_json
from memorywall.plan.search import Trial

# Two backends, two precisions, three batch limits: most candidates pruned by their
# estimate, the rest searched.
QUERY = Query(
    model=load_model("llama-3.1-8b"),
    workload=SyntheticWorkload(Fixed(64), Fixed(16)),
    slo=Slo(ttft_s=2.0, tpot_s=0.02),
    load=LoadKind.USERS,
    num_prompts=8,
)
SPACE = Space(
    hardware=(load_hardware("h100-sxm"), load_hardware("wse-3")),
    precisions=(Precision.BF16, Precision.FP8),
    max_devices=1,
    max_num_seqs=(1, 4, 64),
)


class _Threads:
    """A pool of `width` threads that counts the searches it was given."""

    def __init__(self, executor: ThreadPoolExecutor, width: int) -> None:
        self._executor, self.width = executor, width
        self.submitted = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future:
        with self._lock:
            self.submitted += 1
        return self._executor.submit(fn, *args)


def _doc(**kwargs: Any) -> dict:
    return json.loads(json.dumps(as_json(plan(QUERY, SPACE, **kwargs))))


def test_waves_give_the_in_order_plan_with_every_rule_in_play():
    in_order = plan(QUERY, SPACE)
    statuses = {e.status for e in in_order.evaluations}
    assert {Status.HOLDS, Status.PRUNED} <= statuses, statuses
    searched = sum(
        1 for e in in_order.evaluations if e.status in (Status.HOLDS, Status.UNREACHABLE)
    )
    expected = json.loads(json.dumps(as_json(in_order)))
    for width in (1, 3, 16):
        with ThreadPoolExecutor(width) as executor:
            pool = _Threads(executor, width)
            assert _doc(pool=pool) == expected, f"width {width}"
        # Width 1 searches exactly what the in-order loop searches; wider may waste a few.
        assert pool.submitted == searched if width == 1 else pool.submitted >= searched


def test_progress_counts_up_to_every_candidate():
    seen: list[tuple[int, int]] = []
    with ThreadPoolExecutor(2) as executor:
        plan(
            QUERY, SPACE, lambda done, total: seen.append((done, total)), pool=_Threads(executor, 2)
        )
    total = seen[0][1]
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


TINY = [
    "plan", "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--precisions", "bf16,fp8",
    "--max-devices", "1", "--max-num-seqs", "1,4", "--input-len", "64", "--output-len", "16",
    "--num-prompts", "8", "--slo", "ttft=2s,tpot=20ms", "--load", "users", "--json",
]  # fmt: skip


def test_jobs_prints_the_same_plan(capsys):
    assert main(TINY) == 0
    one = json.loads(capsys.readouterr().out)
    assert main([*TINY, "--jobs", "2"]) == 0
    assert json.loads(capsys.readouterr().out) == one


def test_jobs_and_ray_are_one_line_errors(capsys):
    assert main([*TINY, "--jobs", "0"]) == 2
    assert "--jobs" in capsys.readouterr().err
    assert main([*TINY, "--jobs", "2", "--ray", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ray and --jobs" in err


def _trial(load: float, holds: bool, goodput: float, peak: int) -> Trial:
    result = {"completed": 10, "request_goodput": goodput, "total_output_tokens": 10}
    return Trial(load=load, holds=holds, result=result, peak_in_flight=peak)


def _candidates(rng: random.Random, n: int) -> list[tuple[Any, Any]]:
    """`n` made-up candidates on two backends and three layouts, estimates descending,
    each with the trials its search gives and how long the search takes (so searches
    finish out of order): a mix of pruned, same and searched ones."""
    out = []
    for i in range(n):
        est = 1000.0 * (n - i) / n
        reached = est * rng.uniform(0.2, 2.5)  # simulation can beat the estimate
        trials = [_trial(1.0, rng.random() < 0.9, reached / 2, rng.randint(1, 40))]
        if rng.random() < 0.8:
            trials.append(_trial(2.0, rng.random() < 0.7, reached, rng.randint(1, 40)))
        c = SimpleNamespace(
            hardware=rng.choice("ab"),
            layout=rng.randrange(3),
            engine=SimpleNamespace(max_num_seqs=rng.choice((8, 16, 64))),
            devices=1,
            trials=trials,
            delay_s=rng.uniform(0, 0.01),
        )
        out.append((c, SimpleNamespace(tok_s_per_device=est)))
    return out


def _fake_search(query: Any, space: Any, c: Any, est: Any) -> list[Trial]:
    time.sleep(c.delay_s)
    return c.trials


@pytest.mark.parametrize("seed", range(12))
def test_waves_settle_every_candidate_as_in_order(seed, monkeypatch):
    """Pruning and reuse decided as in order whatever order the searches finish in."""
    monkeypatch.setattr(planner, "search", _fake_search)
    monkeypatch.setattr(waves, "search", _fake_search)
    scored = _candidates(random.Random(seed), 30)
    expected = planner._evaluate_in_order(QUERY, SPACE, scored, None)
    statuses = {e.status for e in expected}
    assert {Status.PRUNED, Status.HOLDS} <= statuses
    width = 1 + seed % 5
    with ThreadPoolExecutor(width) as executor:
        got = waves.evaluate_in_waves(QUERY, SPACE, scored, _Threads(executor, width))
    assert [(e.candidate, e.status, e.note, e.trials) for e in got] == [
        (e.candidate, e.status, e.note, e.trials) for e in expected
    ]


def test_the_made_up_candidates_exercise_reuse(monkeypatch):
    monkeypatch.setattr(planner, "search", _fake_search)
    seen = set()
    for seed in range(12):
        scored = _candidates(random.Random(seed), 30)
        seen |= {e.status for e in planner._evaluate_in_order(QUERY, SPACE, scored, None)}
    assert seen == set(Status)
