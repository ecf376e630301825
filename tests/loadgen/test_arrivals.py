"""Arrival schedules: vLLM gamma semantics, determinism, distribution sanity, worker split."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest

from memorywall.loadgen.arrivals import constant, gamma, poisson, split_for_workers, with_offsets
from memorywall.loadgen.records import RequestSpec


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---- exact values -------------------------------------------------------------------------


def test_poisson_is_cumulative_exponential_gaps_first_after_one_gap():
    gaps = rng(0).exponential(scale=1 / 2.0, size=3)
    offsets = poisson(2.0, 3, rng(0))
    np.testing.assert_array_equal(offsets, np.cumsum(gaps))
    assert offsets[0] == gaps[0] > 0  # vLLM: the first request waits one gap
    # Pinned for numpy's PCG64 stream (numpy 2.x).
    assert offsets.tolist() == pytest.approx(
        [0.3399659519844548, 0.8497645027173871, 0.8596678340119148], rel=1e-12
    )


def test_gamma_matches_vllm_shape_and_scale():
    rate, burstiness = 2.0, 0.5
    gaps = rng(0).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=3)
    offsets = gamma(rate, burstiness, 3, rng(0))
    np.testing.assert_array_equal(offsets, np.cumsum(gaps))
    assert offsets.tolist() == pytest.approx(
        [0.43566582109041196, 0.4373446507541619, 1.4223469652584997], rel=1e-12
    )


def test_burstiness_one_is_poisson():
    np.testing.assert_array_equal(gamma(5.0, 1.0, 50, rng(3)), poisson(5.0, 50, rng(3)))


def test_constant():
    assert constant(2.0, 3).tolist() == [0.5, 1.0, 1.5]
    assert constant(4, 1).tolist() == [0.25]


def test_infinite_burstiness_is_constant_and_draws_nothing():
    g = rng(0)
    np.testing.assert_array_equal(gamma(2.0, math.inf, 4, g), constant(2.0, 4))
    assert g.random() == rng(0).random()


def test_infinite_rate_sends_everything_at_zero():
    assert gamma(math.inf, 1.0, 3, rng()).tolist() == [0.0, 0.0, 0.0]
    assert constant(math.inf, 2).tolist() == [0.0, 0.0]


def test_normalize_total_lands_last_offset_on_n_over_rate():
    raw = poisson(4.0, 10, rng(1))
    scaled = poisson(4.0, 10, rng(1), normalize_total=True)
    assert scaled[-1] == pytest.approx(10 / 4.0, rel=1e-12)
    np.testing.assert_allclose(scaled / raw, scaled[-1] / raw[-1], rtol=1e-12)


# ---- determinism --------------------------------------------------------------------------


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 3.0])
def test_same_seed_same_offsets_different_seed_different(burstiness):
    a = gamma(10.0, burstiness, 100, rng(7))
    np.testing.assert_array_equal(a, gamma(10.0, burstiness, 100, rng(7)))
    assert not np.array_equal(a, gamma(10.0, burstiness, 100, rng(8)))


def test_offsets_are_positive_and_non_decreasing():
    offsets = gamma(100.0, 0.1, 10_000, rng(2))
    assert offsets[0] > 0
    assert np.all(np.diff(offsets) >= 0)


def test_does_not_touch_global_random_state():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    poisson(1.0, 100, rng())
    np.testing.assert_array_equal(np.random.get_state()[1], before)


# ---- distribution sanity ------------------------------------------------------------------


def gaps(offsets: np.ndarray) -> np.ndarray:
    return np.diff(offsets, prepend=0.0)


def test_poisson_mean_gap_and_cv():
    rate = 20.0
    g = gaps(poisson(rate, 200_000, rng(11)))
    assert g.mean() == pytest.approx(1 / rate, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("burstiness", [0.2, 0.5, 2.0, 8.0])
def test_gamma_mean_gap_and_cv(burstiness):
    rate = 50.0
    g = gaps(gamma(rate, burstiness, 200_000, rng(12)))
    assert g.mean() == pytest.approx(1 / rate, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


# ---- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0, -1.0, math.nan, "2", True])
def test_bad_rate(rate):
    with pytest.raises(ValueError, match="rate") as e:
        gamma(rate, 1.0, 3, rng())
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="rate"):
        poisson(rate, 3, rng())
    with pytest.raises(ValueError, match="rate"):
        constant(rate, 3)


@pytest.mark.parametrize("burstiness", [0, -0.5, math.nan, None])
def test_bad_burstiness(burstiness):
    with pytest.raises(ValueError, match="burstiness"):
        gamma(1.0, burstiness, 3, rng())


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_bad_n(n):
    with pytest.raises(ValueError, match="number of requests"):
        poisson(1.0, n, rng())
    with pytest.raises(ValueError, match="number of requests"):
        constant(1.0, n)


# ---- attaching offsets and splitting ------------------------------------------------------


def specs(n: int) -> list[RequestSpec]:
    return [RequestSpec(index=i, prompt_tokens=10 + i, output_tokens=5) for i in range(n)]


def test_with_offsets():
    out = with_offsets(specs(3), np.array([0.5, 1.0, 1.0]))
    assert [s.offset_s for s in out] == [0.5, 1.0, 1.0]
    assert all(type(s.offset_s) is float for s in out)
    assert [(s.index, s.prompt_tokens) for s in out] == [(0, 10), (1, 11), (2, 12)]


@pytest.mark.parametrize(
    ("offsets", "match"),
    [
        ([0.1, 0.2], "3 specs but 2 offsets"),
        ([0.1, 0.2, 0.3, 0.4], "3 specs but 4 offsets"),
        ([-0.1, 0.2, 0.3], ">= 0"),
        ([0.1, math.nan, 0.3], "finite"),
        ([0.1, 0.3, 0.2], "offset 2 is before offset 1"),
    ],
)
def test_with_offsets_rejects(offsets, match):
    with pytest.raises(ValueError, match=match):
        with_offsets(specs(3), offsets)


@pytest.mark.parametrize("workers", [1, 2, 3, 7, 20])
def test_split_for_workers_union_equals_input(workers):
    scheduled = with_offsets(specs(10), poisson(5.0, 10, rng(4)))
    parts = split_for_workers(scheduled, workers)
    assert len(parts) == workers
    union = sorted((s for part in parts for s in part), key=lambda s: s.index)
    assert union == scheduled  # absolute offsets and indices kept
    for w, part in enumerate(parts):
        assert [s.index for s in part] == list(range(w, 10, workers))
        assert all(a.offset_s <= b.offset_s for a, b in pairwise(part))


def test_split_for_workers_deterministic():
    s = specs(9)
    assert split_for_workers(s, 4) == split_for_workers(s, 4)


@pytest.mark.parametrize("workers", [0, -2, 1.5, True])
def test_split_for_workers_bad(workers):
    with pytest.raises(ValueError, match="workers"):
        split_for_workers(specs(3), workers)
