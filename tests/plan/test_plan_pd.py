"""`memorywall plan` with disaggregated fleets: a tiny space whose answer is worked out by
hand, the JSON and table labels, and the CLI's `--pd` switches."""

from __future__ import annotations

import json
import math

import pytest

from memorywall.cli import main
from memorywall.core import (
    Batch,
    Placement,
    Precision,
    PrefillChunk,
    StepModel,
    load_hardware,
    load_model,
    plan_deployment,
    predict,
)
from memorywall.core.kv_transfer import kv_link, kv_transfer
from memorywall.loadgen.slo import Slo
from memorywall.loadgen.workload import Fixed, SyntheticWorkload
from memorywall.plan.planner import LoadKind, PdSpace, Query, Space, Status, plan
from memorywall.plan.report import as_json, table

PROMPT, OUTPUT = 64, 16
SPLIT = "PD h100-sxm->wse-3"


def _fp8(hw: str):
    return plan_deployment(
        load_hardware(hw), load_model("llama-3.1-8b"), weight_precision=Precision.FP8
    )


def _split_ttft_s() -> float:
    """One user's TTFT through the split: h100 prefill, KV over the NICs, one wafer step."""
    h100, wse = _fp8("h100-sxm"), _fp8("wse-3")
    prefill_s = StepModel(h100).step_cost(Batch(prefill=[PrefillChunk(PROMPT)])).time_s
    transfer_s = kv_transfer(h100, kv_link(h100, wse), PROMPT).exposed_s
    first = Batch(prefill=[PrefillChunk(1, PROMPT - 1, True)])
    return prefill_s + transfer_s + StepModel(wse).step_cost(first).time_s


@pytest.fixture(scope="module")
def result():
    """One sequence at a time on every engine, so a second user always waits a whole
    request (16 wafer steps, longer than the TTFT bound leaves): every candidate that holds
    holds at exactly one user. TPOT bound between the wafer's and the h100's batch-1 step:
    aggregated h100 cannot hold it at any load."""
    wse, h100 = (
        predict(_fp8(hw), batch=1, context=PROMPT + OUTPUT).decode_step_s
        for hw in ("wse-3", "h100-sxm")
    )
    query = Query(
        model=load_model("llama-3.1-8b"),
        workload=SyntheticWorkload(Fixed(PROMPT), Fixed(OUTPUT)),
        slo=Slo(ttft_s=1.5 * _split_ttft_s(), tpot_s=math.sqrt(wse * h100)),
        load=LoadKind.USERS,
        num_prompts=8,
    )
    space = Space(
        hardware=(load_hardware("h100-sxm"), load_hardware("wse-3")),
        precisions=(Precision.FP8,),
        placements=(Placement.RESIDENT,),
        max_devices=1,
        max_num_seqs=(1,),
    )
    return plan(query, space, pd=PdSpace(prefill_workers=(1, 2)))


def test_split_holds_one_user_with_ttft_of_prefill_transfer_and_a_step(result):
    ranked = result.ranked(SPLIT)
    assert [e.candidate.fleet.prefill_workers for e in ranked] == [1, 2]  # fewer devices first
    for ev in ranked:
        best = ev.best
        assert best.load == 1 and all(not t.holds for t in ev.trials if t.load > 1)
        assert best.result["p99_ttft_ms"] / 1e3 == pytest.approx(_split_ttft_s(), rel=1e-6)
    one, two = ranked
    assert one.candidate.devices == 2 and two.candidate.devices == 3
    assert one.goodput_tok_s == pytest.approx(two.goodput_tok_s, rel=1e-9)
    assert one.tok_s_per_device == pytest.approx(one.goodput_tok_s / 2)
    assert one.tok_s_per_kw == pytest.approx(one.goodput_tok_s / (0.7 + 23.0))  # h100 + CS-3


def test_the_three_answers_side_by_side(result):
    assert result.backends() == ["h100-sxm", "wse-3", SPLIT]
    assert result.ranked("h100-sxm") == []  # its batch-1 step misses the TPOT bound
    assert result.ranked("wse-3")[0].best.load == 1
    text = table(result)
    assert "PD 1P x 1 h100-sxm fp8 + 1D x 1 wse-3 fp8 resident, nic 50 GB/s, max 1 seqs" in text
    assert "h100-sxm: no candidate holds the SLO" in text
    doc = as_json(result)
    assert json.loads(json.dumps(doc)) == doc
    split = doc["best"][SPLIT]
    assert split["kind"] == "pd" and split["devices"] == 2
    assert split["pd"]["prefill"]["hardware"] == "h100-sxm"
    assert split["pd"]["decode"]["hardware"] == "wse-3"
    assert split["pd"]["prefill_workers"] == 1 and split["pd"]["link"]["kind"] == "nic"
    assert doc["best"]["wse-3"]["kind"] == "aggregated"
    assert doc["space"]["pd"]["prefill_workers"] == [1, 2]
    assert {c["status"] for c in doc["candidates"]} <= {s.value for s in Status}


CLI = [
    "plan", "--model", "llama-3.1-8b", "--precisions", "fp8", "--placements", "resident",
    "--max-devices", "1", "--max-num-seqs", "4", "--input-len", "64", "--output-len", "16",
    "--num-prompts", "8", "--slo", "ttft=2s", "--load", "users", "--pd-prefill-workers", "1",
    "--json",
]  # fmt: skip


def test_pd_searches_the_split_and_without_it_the_table_says_how(capsys):
    assert main([*CLI, "--hardware", "h100-sxm,wse-3", "--pd"]) == 0
    assert SPLIT in json.loads(capsys.readouterr().out)["best"]
    table_argv = [a for a in CLI if a != "--json"]
    assert main([*table_argv, "--hardware", "h100-sxm,wse-3"]) == 0
    out = capsys.readouterr().out
    assert "PD " not in out.split("\n", 1)[1] and out.rstrip().endswith(
        "(--pd: also try prefill on the GPUs with decode on the wafers)"
    )


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--hardware", "h100-sxm", "--pd"], "must name a GPU profile"),
        (["--hardware", "h100-sxm,wse-3", "--pd", "--kv-link", "nvlink"], "nvlink cannot join"),
        (["--hardware", "h100-sxm,wse-3", "--pd", "--kv-link", "fast"], "--kv-link"),
        (["--hardware", "h100-sxm,wse-3", "--pd-prefill-workers", "0"], "must be >= 1"),
    ],
)
def test_bad_pd_flags_are_one_line_errors_with_exit_2(capsys, extra, words):
    assert main([*CLI, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("memorywall: error:") and words in err
