"""docs/accuracy.md holds the numbers benchmarks/accuracy.py computes now (within rounding)."""

from __future__ import annotations

import re
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


@cache
def accuracy():
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import accuracy
    finally:
        sys.path.remove(str(REPO))
    return accuracy


@cache
def fresh() -> str:
    acc = accuracy()
    return acc.markdown(acc.load_aiconfigurator())


def numbers(text: str) -> list[tuple[float, float]]:
    """Each number printed in `text`, with one unit of its last printed digit."""
    out = []
    for n in NUMBER.findall(text):
        decimals = len(n.split(".")[1]) if "." in n else 0
        out.append((float(n.replace(",", "")), 10.0**-decimals))
    return out


def test_page_numbers_equal_the_benchmarks():
    page = (REPO / "docs" / "accuracy.md").read_text()
    got, want = numbers(page), numbers(fresh())
    assert len(got) == len(want)
    for (g, unit), (w, _) in zip(got, want, strict=True):
        # Another CPU's last-bit differences can move a rounded figure by one last digit.
        assert abs(g - w) <= 1.01 * unit, (g, w)


def test_page_marks_held_out_and_fit_points():
    acc = accuracy()
    points = acc.measured_points(acc.load_aiconfigurator())
    assert {p.used for p in points} == {"fit", "held out"}
    assert sum(p.used == "held out" for p in points) == 6
    page = fresh()
    for regime in acc.REGIMES:
        assert f"| {regime} |" in page, regime


def test_regime_statistics_are_those_of_the_points():
    acc = accuracy()
    points = acc.measured_points(acc.load_aiconfigurator())
    held = [p.error for p in points if p.used == "held out" and p.regime.startswith("decode")]
    median, top = (float(x.rstrip("%")) / 100 for x in acc._stats(held).split(" | "))
    assert top == pytest.approx(max(abs(e) for e in held), abs=5e-4)
    assert median == pytest.approx(float(np.median(np.abs(held))), abs=5e-4)


def test_mixed_section_holds_every_mixed_step_held_out():
    acc = accuracy()
    mixed = acc.mixed_points(acc.load_aiconfigurator())
    assert len(mixed) == 7 and {p.used for p in mixed} == {"held out"}
    assert {p.regime for p in mixed} == {acc.MIXED, acc.MIXED_ALONE}
    page = fresh()
    assert "## Mixed steps: decodes beside a prefill chunk" in page
    for p in mixed:
        assert f"| {p.label} | {acc._fmt(p.measured, p.unit)} |" in page, p.label
    errors = [abs(p.error) for p in mixed]
    assert f"mixed steps median {np.median(errors):.1%}, max {max(errors):.1%}" in page
