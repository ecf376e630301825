"""Tick labels on every plot: plain numbers, at least two, never on top of each other."""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import pytest

from memorywall.loadgen.plots import level_axis, plain, plain_log_axis

PLAIN = re.compile(r"^\d{1,3}(,\d{3})*(\.\d+)?$")
RANGES = [
    (1.2, 1.9),  # a fraction of a decade: matplotlib's default overlaps here
    (0.05, 0.4),
    (5.0, 80.0),
    (118.0, 1800.0),
    (1.4, 450.0),
    (20.0, 2400.0),
    (3.0, 60_000.0),
    (1024.0, 130_048.0),
]


def _labels(fig, axis) -> list:
    """Every tick label drawn in view, major and minor (matplotlib labels minor ticks on a
    short log axis, and those are the ones that collide)."""
    fig.canvas.draw()
    lo, hi = sorted(axis.get_view_interval())
    pairs = [
        *zip(axis.get_majorticklabels(), axis.get_majorticklocs(), strict=True),
        *zip(axis.get_minorticklabels(), axis.get_minorticklocs(), strict=True),
    ]
    return [t for t, v in pairs if lo <= v <= hi and t.get_text()]


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("which", ["x", "y"])
@pytest.mark.parametrize(("lo", "hi"), RANGES)
def test_log_axis_labels_are_plain_and_apart(which, lo, hi):
    fig, ax = plt.subplots(figsize=(4.6, 4.0))  # the study's panel size, the smallest drawn
    values = [lo, (lo * hi) ** 0.5, hi]
    ax.plot(values, values) if which == "x" else ax.plot([1, 2, 3], values)
    plain_log_axis(ax, which, values)
    axis = ax.xaxis if which == "x" else ax.yaxis
    labels = _labels(fig, axis)
    texts = [t.get_text() for t in labels]
    assert len(texts) >= 2, texts
    assert all(PLAIN.match(t) for t in texts), texts  # no 10^x, no 6x10^0
    boxes = [t.get_window_extent() for t in labels]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not _overlap(a, b), texts
    plt.close(fig)


def test_level_axis_ticks_are_the_levels_run():
    fig, ax = plt.subplots()
    ax.plot([1, 8, 32], [1, 2, 3])
    level_axis(ax, [1, 8, 32, 8], "concurrent users")
    texts = [t.get_text() for t in _labels(fig, ax.xaxis)]
    assert texts == ["1", "8", "32"]
    assert ax.get_xlabel() == "concurrent users"
    plt.close(fig)


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0"), (1, "1"), (2.5, "2.5"), (1200, "1,200"), (100_000, "100,000"), (0.05, "0.05")],
)
def test_plain(value, text):
    assert plain(value) == text
