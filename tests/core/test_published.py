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
