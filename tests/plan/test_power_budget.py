"""`--power-budget` parsing (issue 29): a power with its unit, in watts; bad values one line."""

from __future__ import annotations

import argparse
import re

import pytest

from memorywall.argtypes import power_watts
from memorywall.cli.usage import Parser, UsageError


@pytest.mark.parametrize(
    ("text", "watts"),
    [
        ("250MW", 250e6),
        ("250 MW", 250e6),
        (" 1.5GW ", 1.5e9),
        ("800kW", 800e3),
        ("800KW", 800e3),
        ("700W", 700.0),
        ("2.5e2MW", 250e6),
    ],
)
def test_power_with_unit(text, watts):
    assert power_watts(text) == pytest.approx(watts, rel=0, abs=1e-6)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("250", "expected a power with its unit"),  # a bare number: no guessing the unit
        ("", "expected a power with its unit"),
        ("MW", "expected a power with its unit"),
        ("250mW", "unknown power unit 'mW' (valid: W, kW, MW, GW)"),
        ("250TW", "unknown power unit 'TW'"),
        ("25..0MW", "expected a number before 'MW'"),
        ("0MW", "must be a finite power > 0"),
        ("-5MW", "must be a finite power > 0"),
        ("infMW", "expected a power with its unit"),  # letters before the unit: no number
        ("1e999MW", "must be a finite power > 0"),
    ],
)
def test_bad_power_is_a_one_line_error(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        power_watts(text)
    parser = Parser(prog="memorywall plan")
    parser.add_argument("--power-budget", type=power_watts)
    with pytest.raises(UsageError) as e:  # main prints it as one line, exit 2
        parser.parse_args(["--power-budget", text])
    assert "--power-budget" in str(e.value) and "\n" not in str(e.value)


# The search: one H100, one sequence at a time, fp8 (tests/plan/test_plan.py's tiny case,
# where one user is the most any copy holds), fed by a budget of 3.5 copies' power.
H100_W = 700.0  # core/profiles/h100-sxm.toml tdp_w


@pytest.fixture(scope="module")
def tiny_result():
    from memorywall.core import Precision, load_hardware, load_model, plan_deployment, predict
    from memorywall.loadgen.slo import Slo
    from memorywall.loadgen.workload import Fixed, SyntheticWorkload
    from memorywall.plan.planner import LoadKind, Query, Space, plan

    model, h100 = load_model("llama-3.1-8b"), load_hardware("h100-sxm")
    fp8 = plan_deployment(h100, model, weight_precision=Precision.FP8)
    step = predict(fp8, batch=1, context=80).decode_step_s
    query = Query(
        model=model,
        workload=SyntheticWorkload(Fixed(64), Fixed(16)),
        slo=Slo(tpot_s=step * 1.1, ttft_s=step * 16 * 1.2 / 2),
        load=LoadKind.USERS,
        num_prompts=8,
    )
    space = Space(hardware=(h100,), precisions=(Precision.FP8,), max_devices=1, max_num_seqs=(1,))
    return plan(query, space)


def test_budget_feeds_whole_copies_and_multiplies_what_one_serves(tiny_result):
    from memorywall.plan.budget import PowerBudget, answer

    assert tiny_result.ranked("h100-sxm")[0].pick.load == 1  # one user per copy
    a = answer(tiny_result, PowerBudget(watts=3.5 * H100_W), "h100-sxm")
    assert (a.deployments, a.devices, a.users) == (3, 3, 3.0)
    assert a.power_w == pytest.approx(3 * H100_W)
    one = tiny_result.ranked("h100-sxm")[0].pick
    assert a.goodput_tok_s == pytest.approx(3 * one.goodput_tok_s, rel=1e-12)
    assert a.tok_s == pytest.approx(3 * one.result["output_throughput"], rel=1e-12)
    # A PUE of 1.25 charges 875 W a copy: 2,450 W feeds two.
    b = answer(tiny_result, PowerBudget(watts=3.5 * H100_W, pue=1.25), "h100-sxm")
    assert (b.deployments, b.deployment_w) == (2, pytest.approx(875.0))
    # Exactly two copies' power feeds two (no rounding down past a whole copy).
    assert answer(tiny_result, PowerBudget(watts=2 * H100_W), "h100-sxm").deployments == 2


def test_budget_below_one_copy_says_why(tiny_result):
    from memorywall.plan.budget import PowerBudget, answer, why_none
    from memorywall.plan.report import as_json, table

    small = PowerBudget(watts=600.0)
    assert answer(tiny_result, small, "h100-sxm") is None
    assert why_none(tiny_result, small, "h100-sxm") == "one copy draws 0.7 kW, over the budget"
    assert "h100-sxm: one copy draws 0.7 kW" in table(tiny_result, budget=small)
    doc = as_json(tiny_result, small)["power_budget"]
    assert doc["backends"]["h100-sxm"] == {
        "answer": None,
        "why": "one copy draws 0.7 kW, over the budget",
    }


@pytest.mark.parametrize(("watts", "pue"), [(0.0, 1.0), (float("inf"), 1.0), (1e6, 0.9)])
def test_bad_budget_in_code_is_a_config_error(watts, pue):
    from memorywall.errors import ConfigError
    from memorywall.plan.budget import PowerBudget

    with pytest.raises(ConfigError):
        PowerBudget(watts=watts, pue=pue)


TINY = [
    "plan", "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--precisions", "fp8",
    "--max-devices", "1", "--max-num-seqs", "4", "--input-len", "64", "--output-len", "16",
    "--num-prompts", "8", "--slo", "ttft=2s",
]  # fmt: skip


def test_cli_budget_in_table_json_and_plot(tmp_path, capsys):
    import json

    from memorywall.cli import main

    assert main([*TINY, "--power-budget", "250MW", "--pue", "1.4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "power budget 250 MW (device TDP x PUE 1.4):" in out
    doc = json.loads((tmp_path / "plan.json").read_text())["power_budget"]
    assert (doc["watts"], doc["pue"]) == (250e6, 1.4)
    a = doc["backends"]["h100-sxm"]["answer"]
    assert a["deployments"] == 250e6 // (H100_W * 1.4) == 255_102
    assert a["power_w"] <= 250e6
    assert (tmp_path / "pareto.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--power-budget", "250"], "expected a power with its unit"),
        (["--power-budget=-1MW"], "must be a finite power > 0"),
        (["--power-budget", "250MW", "--pue", "0.8"], "must be >= 1"),
        (["--pue", "1.2"], "--pue: needs --power-budget"),
    ],
)
def test_cli_bad_budget_is_one_line_exit_2(capsys, extra, words):
    from memorywall.cli import main

    assert main([*TINY, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("memorywall: error:") and words in err
