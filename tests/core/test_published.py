"""Every published result is in published.toml, predicted, and printed with its error."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from functools import cache
from itertools import pairwise
from pathlib import Path

import pytest

from memorywall.core.calibration import ErrorTable, load_published
from memorywall.core.published import PREDICTORS, published_comparisons

REPO = Path(__file__).resolve().parents[2]
SOURCES = REPO / "docs" / "sources" / "published-results.md"


@cache
def table() -> ErrorTable:
    return published_comparisons()


def source_table_rows() -> list[str]:
    """The data rows of published-results.md's tables, as their first three cells."""
    lines = [*SOURCES.read_text().splitlines(), ""]
    is_rule = re.compile(r"^\|(\s*-+\s*\|)+$").match
    keys = []
    for line, following in pairwise(lines):
        if not line.startswith("|") or is_rule(line) or is_rule(following):  # rule or header
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        keys.append(" | ".join(cells[:3]))
    return keys


def test_every_source_table_row_has_an_entry():
    keys = source_table_rows()
    assert len(keys) == 11  # 5 wafer rows, 6 GPU rows
    covered = {r["table_row"] for r in load_published()}
    assert [k for k in keys if k not in covered] == []


def test_h100_comparison_points_have_entries():
    # "best H100 instance for Llama 3.1 8B 242 tok/s, for Llama 3.1 70B 128 tok/s"
    text = " ".join(SOURCES.read_text().split())
    assert "best H100 instance for Llama 3.1 8B 242 tok/s" in text
    assert "for Llama 3.1 70B 128 tok/s" in text
    values = {r["value"] for r in load_published() if r["table_row"].startswith("comparison:")}
    assert values == {242, 128}


def test_every_entry_points_at_a_source_row():
    known = set(source_table_rows())
    for r in load_published():
        assert r["table_row"] in known or r["table_row"].startswith("comparison:"), r["label"]


def test_entries_are_well_formed():
    rows = load_published()
    assert len({r["label"] for r in rows}) == len(rows)
    for r in rows:
        assert r["metric"] in PREDICTORS, r["label"]
        assert r["value"] > 0 and "source" in r, r["label"]
        assert ("concurrency" in r) != ("max_batch" in r), r["label"]


def test_original_schema_agrees_with_the_metric_value():
    for r in load_published():
        if "tokens_per_s_per_user" in r:
            per_user = r["value"] if r["metric"] == "tokens_per_s_per_user" else 1 / r["value"]
            assert r["tokens_per_s_per_user"] == pytest.approx(per_user, rel=1e-3), r["label"]


def test_one_speculative_assumption_for_every_speculative_row():
    specs = [r["speculative"] for r in load_published() if "speculative" in r]
    assert len(specs) >= 4
    assert all(s == specs[0] for s in specs)
    assert specs[0]["draft_model"] == "llama-3.1-8b"


def test_predictions_are_finite_and_positive():
    assert len(table().rows) == len(load_published())
    for c in table().rows:
        assert math.isfinite(c.predicted) and c.predicted > 0, c.label
        assert math.isfinite(c.error), c.label
        assert c.how, c.label


def test_fit_rows_are_exact_and_say_so():
    fit = [c for c in table().rows if c.fit]
    assert len(fit) == 2
    for c in fit:
        assert abs(c.error) < 1e-6, c.label
        assert "fit row" in c.how and "by construction" in c.how
    assert all("fit row" not in c.how for c in table().rows if not c.fit)


def test_error_table_summaries_work():
    t = table()
    errors = sorted(abs(r.error) for r in t.rows)
    assert t.max_abs_error == errors[-1]
    middle = len(errors) // 2
    median = errors[middle] if len(errors) % 2 else (errors[middle - 1] + errors[middle]) / 2
    assert t.median_abs_error == pytest.approx(median, rel=1e-12)
    assert t.max_abs_error > 0  # rows not used in any fit do not match exactly


def test_script_prints_one_line_per_row():
    result = subprocess.run(
        [sys.executable, "benchmarks/published_table.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    header, body = lines[0], lines[1:]
    assert header.startswith("| row | compared | published | predicted | error |")
    assert len(body) == len(load_published())
    for row, line in zip(load_published(), body, strict=True):
        assert line.startswith(f"| {row['label']} |")
        assert re.search(r"\| [+-]\d+\.\d% \|", line), line


def test_fused_activation_traffic_by_hand():
    from memorywall.core.model import load_model
    from memorywall.core.published import fused_activation_bytes_per_hidden

    # Llama 3.1 8B: (16 x 4096 + 6 x 14336 + 4 x (4096 + 1024)) / 4096 = 172032 / 4096 = 42
    model = load_model("llama-3.1-8b")
    assert fused_activation_bytes_per_hidden(model, 1) == pytest.approx(42.0, rel=1e-12)
    # TP2 splits the per-device f, q and k: (65536 + (86016 + 20480) / 2) / 4096 = 29
    assert fused_activation_bytes_per_hidden(model, 2) == pytest.approx(29.0, rel=1e-12)


def test_fused_rows_run_without_launch_floor_and_with_fused_traffic():
    from memorywall.core.published import published_deployment

    for r in load_published():
        d = published_deployment(r)
        if r.get("kernels") == "fused":
            assert d.hardware.latency.launch_per_layer_s == 0.0, r["label"]
            assert d.hardware.execution.value == "graphs", r["label"]
            assert d.hardware.kernels.activation_bytes_per_hidden < 60, r["label"]
        elif d.hardware.kind.value == "gpu":
            assert d.hardware.latency.launch_per_layer_s > 0.0, r["label"]


def test_speculative_rows_say_what_the_published_speed_would_take():
    rows = [c for c in table().rows if "speculative" in c.how]
    assert len(rows) == 3
    for c in rows:
        assert "even with free drafting" in c.how, c.label
        peak = float(re.search(r"peaks at ([\d,]+) tok/s", c.how).group(1).replace(",", ""))
        # The assumed 8B draft cannot reach the published figure at any k, acceptance 1.
        assert c.predicted < peak < c.published, c.label


def _published_table_module():
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import published_table
    finally:
        sys.path.remove(str(REPO))
    return published_table


def test_loaded_rows_run_on_the_offline_engine():
    pt = _published_table_module()
    rows = load_published()
    loaded = [r for r in rows if r.get("concurrency", 1) > 1]
    assert len(loaded) == 3
    assert all(pt.simulated(r) is None for r in rows if r not in loaded)
    itl_row = next(r for r in loaded if r["metric"] == "itl_s")
    sim = pt.simulated(itl_row)
    assert sim.requests == itl_row["concurrency"] * pt.SIM_REQUESTS_PER_USER
    formula = next(c for c in table().rows if c.label == itl_row["label"])
    # Prefills share steps with the decodes, so a token waits longer than a pure decode step.
    assert sim.itl_s > formula.predicted
