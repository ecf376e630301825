"""`memorywall.plan`: a tiny search space with an answer checked by hand, the load search
and its overload check on their own, and the JSON document."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from memorywall.core import Precision, load_hardware, load_model, plan_deployment, predict
from memorywall.loadgen.slo import Slo
from memorywall.loadgen.workload import Fixed, SyntheticWorkload
from memorywall.plan.planner import LoadKind, Query, Space, Status, plan
from memorywall.plan.report import as_json, pareto_plot, table
from memorywall.plan.search import Trial, kept_up, search_load
from memorywall.plan.space import candidates, layouts

PROMPT, OUTPUT = 64, 16


def _step_s(precision: Precision) -> float:
    d = plan_deployment(
        load_hardware("h100-sxm"), load_model("llama-3.1-8b"), weight_precision=precision
    )
    return predict(d, batch=1, context=PROMPT + OUTPUT).decode_step_s


def _tiny(slo: Slo, **space) -> tuple[Query, Space]:
    query = Query(
        model=load_model("llama-3.1-8b"),
        workload=SyntheticWorkload(Fixed(PROMPT), Fixed(OUTPUT)),
        slo=slo,
        load=LoadKind.USERS,
        num_prompts=8,
    )
    space = Space(
        hardware=(load_hardware("h100-sxm"),),
        precisions=(Precision.BF16, Precision.FP8),
        max_devices=1,
        max_num_seqs=(1,),
        **space,
    )
    return query, space


def test_only_fp8_holds_a_tpot_bound_between_the_two_batch_one_steps():
    """One H100, one sequence at a time: TPOT is the batch-1 decode step. fp8 reads half
    the weight bytes of bf16, so a bound between the two steps admits fp8 alone, and with
    one sequence at a time any second user waits a whole request: one user is the most."""
    bf16, fp8 = _step_s(Precision.BF16), _step_s(Precision.FP8)
    assert fp8 < bf16
    bound = (bf16 + fp8) / 2
    # One user's request: prefill, then OUTPUT - 1 steps; a second user's waits for it.
    e2e_one = bound * OUTPUT * 1.2
    query, space = _tiny(Slo(tpot_s=bound, ttft_s=e2e_one / 2))
    result = plan(query, space)
    by_precision = {e.candidate.deployment.weight_precision: e for e in result.evaluations}
    # The core already says bf16's batch-1 step misses the bound: not simulated.
    bf16_eval = by_precision[Precision.BF16]
    assert bf16_eval.status is Status.PRUNED and bf16_eval.estimate_tok_s_per_device == 0
    assert bf16_eval.best is None
    pick = result.ranked("h100-sxm")
    assert [e.candidate.deployment.weight_precision for e in pick] == [Precision.FP8]
    best = pick[0].best
    assert best.load == 1
    assert best.result["p99_tpot_ms"] / 1e3 == pytest.approx(fp8, rel=0.02)
    assert all(not t.holds for t in pick[0].trials if t.load > 1)
    text = table(result)
    assert "1 x h100-sxm TP1 fp8 resident, max 1 seqs" in text and "bf16" not in text


def test_layout_splits_and_what_does_not_fit():
    h100, wafer = load_hardware("h100-sxm"), load_hardware("wse-3")
    model = load_model("llama-3.1-8b")  # 32 heads, 32 layers
    assert layouts(h100, model, 8) == [(1, 8), (2, 4), (4, 2), (8, 1)]
    assert layouts(wafer, model, 4) == [(1, 4)]
    big = load_model("llama-3.1-70b")
    found, skipped = candidates(
        big, Space(hardware=(h100,), precisions=(Precision.BF16,), max_devices=2)
    )
    assert found == []
    assert len(skipped) == 1 and "over --max-devices 2" in skipped[0].reason


def test_load_search_finds_the_break_within_tolerance():
    calls = []

    def run(load: float) -> Trial:
        calls.append(load)
        ok = load <= 37.3
        result = {"completed": 10, "total_output_tokens": 10, "request_goodput": load if ok else 0}
        return Trial(load=load, holds=ok, result=result, peak_in_flight=1)

    search_load(run, 5.0, integer=False, tol=0.05)
    held = max(x for x in calls if x <= 37.3)
    broke = min(x for x in calls if x > 37.3)
    assert broke / held <= 1.05 and held <= 37.3 < broke
    assert len(calls) < 12


def test_kept_up_spots_a_growing_queue():
    sent = list(range(0, 1000, 10))  # 100 arrivals, 10 ns apart
    steady = [t + 50 for t in sent]  # five in flight throughout
    backlog = [t + 50 + 2 * i * 10 for i, t in enumerate(sent)]  # served at half the rate
    assert kept_up(sent, sorted(steady))
    assert not kept_up(sent, sorted(backlog))


@pytest.mark.parametrize("seed", range(5))
def test_kept_up_does_not_mistake_poisson_swings_for_a_queue(seed):
    """A steady state (every request served in the same time) swings in flight by half
    from instant to instant; the check must not call that an overload."""
    rng = np.random.default_rng(seed)
    sent = np.cumsum(rng.exponential(1e7, 512)).astype(np.int64)  # 100 req/s
    done = sent + 400_000_000  # 0.4 s each: ~40 in flight
    assert kept_up(list(sent), list(done))
    assert not kept_up(list(sent), sorted(sent + 400_000_000 + 2 * (sent - sent[0]) // 10))


def test_json_document_shape_and_same_seed_same_document(tmp_path):
    query, space = _tiny(Slo(tpot_s=_step_s(Precision.FP8) * 1.05))
    doc = as_json(plan(query, space))
    assert json.loads(json.dumps(doc)) == doc
    assert set(doc) >= {"model", "workload", "slo", "load", "space", "best", "candidates"}
    assert doc["slo"]["percentile"] == 99 and doc["load"] == "users"
    best = doc["best"]["h100-sxm"]
    assert best["weight_precision"] == "fp8" and best["status"] == "holds"
    for key in ("devices", "tensor_parallel", "pipeline_parallel", "max_num_seqs", "max_load"):
        assert key in best
    assert best["tok_s_per_device"] == pytest.approx(best["goodput_tok_s"])
    assert best["tok_s_per_kw"] == pytest.approx(best["goodput_tok_s"] / 0.7)  # 700 W H100
    assert {c["status"] for c in doc["candidates"]} <= {s.value for s in Status}
    assert as_json(plan(query, space)) == doc
    png = pareto_plot(plan(query, space), tmp_path / "pareto.png")
    assert png.stat().st_size > 10_000


def test_a_candidate_that_misses_the_bound_at_the_lightest_load_is_unreachable():
    bf16, fp8 = _step_s(Precision.BF16), _step_s(Precision.FP8)
    query, space = _tiny(Slo(tpot_s=(bf16 + fp8) / 2))
    only_bf16 = Space(
        hardware=space.hardware, precisions=(Precision.BF16,), max_devices=1, max_num_seqs=(1,)
    )
    result = plan(query, only_bf16)
    (ev,) = result.evaluations
    assert ev.status is Status.UNREACHABLE and ev.trials
    assert all(t.result["p99_tpot_ms"] / 1e3 > (bf16 + fp8) / 2 for t in ev.trials)
    assert result.ranked("h100-sxm") == []
    assert "no candidate holds the SLO" in table(result)


def test_expert_parallel_candidates_only_when_asked_and_only_for_moe():
    nvl = load_hardware("gb200-nvl72")
    space = Space(hardware=(nvl,), precisions=(Precision.FP8,), max_devices=2, max_num_seqs=(32,))
    moe = load_model("gpt-oss-120b")  # 128 experts: EP2 splits them
    plain, _ = candidates(moe, space)
    with_ep, _ = candidates(moe, replace(space, expert_parallel=True))
    described = [c.describe() for c in with_ep]
    assert [c.describe() for c in plain] == [d for d in described if "EP" not in d]
    assert [d for d in described if "EP" in d] == [
        "2 x gb200-nvl72 TP2xEP2 fp8 resident, max 32 seqs"
    ]
    dense, _ = candidates(load_model("llama-3.1-8b"), replace(space, expert_parallel=True))
    assert not any(c.deployment.expert_parallel > 1 for c in dense)
