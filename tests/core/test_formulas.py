"""Each cost formula on hand-computed cases, a whole step worked out by hand, and the numpy
sweep agreeing with the scalar path point by point."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from memorywall.core import (
    Batch,
    Bound,
    Precision,
    PrefillChunk,
    Speculative,
    StepModel,
    Work,
    load_hardware,
    load_model,
    plan_deployment,
)
from memorywall.core.cost import (
    allreduce_bytes_per_device,
    combine_s,
    distinct_experts,
    link_time_s,
)
from memorywall.core.hardware import Efficiency, ExecutionMode, KernelCosts, LatencyFloors
from memorywall.core.work import _window_pairs, _window_pairs_array
from memorywall.errors import ConfigError

# --- small formulas ----------------------------------------------------------------------------


def test_distinct_experts():
    assert distinct_experts(8, 2, 1) == pytest.approx(2.0, rel=1e-12)  # 8 * (1 - 6/8)
    assert distinct_experts(8, 2, 0) == 0.0
    # T=2: 8 * (1 - (3/4)^2) = 8 * 7/16 = 3.5
    assert distinct_experts(8, 2, 2) == pytest.approx(3.5, rel=1e-12)
    assert distinct_experts(8, 2, 10_000) == pytest.approx(8.0, rel=1e-12)
    assert distinct_experts(256, 8, 1) == pytest.approx(8.0, rel=1e-12)
    tokens = np.array([0.0, 1.0, 2.0])
    np.testing.assert_allclose(distinct_experts(8, 2, tokens), [0.0, 2.0, 3.5], rtol=1e-12)


def test_allreduce_bytes_per_device():
    # ring: 2 (tp-1)/tp x values x 2 bytes
    assert allreduce_bytes_per_device(1, 4096) == 0.0
    assert allreduce_bytes_per_device(2, 4096) == pytest.approx(2 * 1 / 2 * 4096 * 2, rel=1e-12)
    assert allreduce_bytes_per_device(8, 8192) == pytest.approx(2 * 7 / 8 * 8192 * 2, rel=1e-12)


def test_link_time_s():
    # 5 us + 1e6 B / 1e9 B/s = 5e-6 + 1e-3
    assert link_time_s(1e6, 1e9, 5e-6) == pytest.approx(1.005e-3, rel=1e-12)
    assert link_time_s(0.0, 1e9, 5e-6) == 5e-6


def test_combine_s():
    # latency 1, memory 3, compute 2, comm 0.5
    assert combine_s(1.0, 3.0, 2.0, 0.0, 0.5) == pytest.approx(1 + 3 + 0.5, rel=1e-12)  # roofline
    assert combine_s(1.0, 3.0, 2.0, 1.0, 0.5) == pytest.approx(1 + 3 + 2 + 0.5, rel=1e-12)  # sum
    assert combine_s(1.0, 3.0, 2.0, 0.25, 0.5) == pytest.approx(1 + 3 + 0.5 + 0.5, rel=1e-12)
    assert combine_s(0.0, 2.0, 3.0, 0.0, 0.0) == 3.0  # symmetric in memory/compute
    out = combine_s(0.0, np.array([1.0, 4.0]), np.array([2.0, 1.0]), 0.5, 0.0)
    np.testing.assert_allclose(out, [2.5, 4.5], rtol=1e-12)


@pytest.mark.parametrize(
    ("k", "a", "expected"),
    [
        (4, 0.0, 1.0),  # nothing accepted: only the target's own token
        (4, 1.0, 5.0),  # all accepted: k + 1
        (1, 1.0, 2.0),
        (3, 0.5, 1.875),  # 1 + 0.5 + 0.25 + 0.125
        (2, 0.7, 1 + 0.7 + 0.49),
    ],
)
def test_speculative_expected_tokens(k, a, expected):
    spec = Speculative(draft_tokens=k, acceptance_rate=a)
    assert spec.expected_tokens_per_step == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("k", "a"), [(0, 0.5), (2, -0.1), (2, 1.1)])
def test_speculative_rejects_bad_values(k, a):
    with pytest.raises(ConfigError):
        Speculative(draft_tokens=k, acceptance_rate=a)


def brute_window_pairs(cached: int, n: int, window: int) -> int:
    return sum(min(x, window) for x in range(cached + 1, cached + n + 1))


def test_window_pairs_against_brute_force():
    for cached, n, window in itertools.product(range(0, 40), range(1, 20), (1, 2, 7, 16, 33)):
        assert _window_pairs(cached, n, window) == brute_window_pairs(cached, n, window), (
            cached,
            n,
            window,
        )
    # and large values, all three branches
    for cached, n, window in [(0, 1000, 4096), (5000, 300, 128), (100, 300, 128), (0, 8192, 128)]:
        assert _window_pairs(cached, n, window) == brute_window_pairs(cached, n, window)


def test_window_pairs_array_matches_scalar():
    cached = np.arange(0, 300)
    for n, window in [(1, 128), (4, 128), (5, 7)]:
        expected = [_window_pairs(int(c), n, window) for c in cached]
        np.testing.assert_array_equal(_window_pairs_array(cached, n, window), expected)


# --- Work --------------------------------------------------------------------------------------


def test_of_batch_mixed_batch_by_hand():
    model = load_model("llama-3.1-8b")  # no window
    batch = Batch(
        decode_contexts=(10, 20),
        prefill=(PrefillChunk(5, cached_tokens=3, last=False), PrefillChunk(4)),
    )
    w = Work.of_batch(batch, model)
    # tokens: 2 decodes + 5 + 4 = 11; logits: 2 decodes + the last chunk only = 3
    assert w.tokens == 11.0
    assert w.logits == 3.0
    # KV read: 10 + 20 (decodes) + 3 (chunk cached) + 0 = 33
    assert w.kv_read_full == 33.0
    # pairs: decodes (10+1) + (20+1) = 32; chunk 1: 5*3 + 5*6/2 = 30; chunk 2: 4*5/2 = 10
    assert w.pairs_full == 72.0
    assert (w.kv_read_window, w.pairs_window) == (0.0, 0.0)


def test_of_batch_windowed_by_hand():
    model = load_model("gpt-oss-120b")  # window 128
    batch = Batch(decode_contexts=(100, 500), prefill=(PrefillChunk(30, cached_tokens=120),))
    w = Work.of_batch(batch, model)
    assert w.kv_read_full == 100 + 500 + 120
    assert w.kv_read_window == 100 + 128 + 120
    # decode 100: min(101,128)=101; decode 500: 128; chunk: sum min(x,128) for x in 121..150
    #   = (121 + 128) * 8 / 2 + 22 * 128 = 996 + 2816 = 3812
    assert w.pairs_window == 101 + 128 + 3812
    assert w.pairs_full == 101 + 501 + (30 * 120 + 30 * 31 // 2)


def test_of_batch_speculative_queries():
    model = load_model("llama-3.1-8b")
    w = Work.of_batch(Batch(decode_contexts=(10,)), model, queries_per_decode=3)
    assert (w.tokens, w.logits, w.kv_read_full) == (3.0, 3.0, 10.0)
    assert w.pairs_full == 11 + 12 + 13  # query i attends 10 cached + i drafts


@pytest.mark.parametrize("name", ["llama-3.1-8b", "gpt-oss-120b", "llama-4-maverick"])
@pytest.mark.parametrize("q", [1, 4])
def test_uniform_decode_matches_of_batch(name, q):
    model = load_model(name)
    for b, c in itertools.product((1, 3, 17), (0, 1, 127, 128, 129, 5000)):
        exact = Work.of_batch(Batch(decode_contexts=(c,) * b), model, q)
        sweep = Work.uniform_decode(np.array(b), np.array(c), model, q)
        for field in dataclasses.fields(Work):
            got = float(getattr(sweep, field.name))
            assert got == pytest.approx(getattr(exact, field.name), rel=1e-12), (field.name, b, c)


# --- a whole step by hand ----------------------------------------------------------------------


def round_h100(overlap: float):
    """Round numbers, no activation traffic, no SM waves (plain FLOPs)."""
    hw = load_hardware("h100-sxm")
    return dataclasses.replace(
        hw,
        kernels=KernelCosts(activation_bytes_per_hidden=0.0, kv_stream_bytes_per_s=1e12),
        parallelism=None,
        resident=dataclasses.replace(hw.resident, bandwidth_bytes_per_s=1e12),
        peak_flops_per_s={Precision.BF16: 1e15},
        efficiency=Efficiency(
            weight_read=1.0, kv_read=1.0, compute=1.0, attention=1.0, overlap=overlap
        ),
        latency=LatencyFloors(per_step_s=0.0, per_layer_s=1e-6, per_layer_per_hidden_s=0.0),
    )


# Llama-3.1-8B, one device, batch 1, context 0, bf16:
#   always-read params 7504924672 -> weight bytes 15009849344
#   KV: 0 cached read + 1 new token written: 32 layers x 2 x 8 x 128 x 2 B = 131072 B
#   memory = (15009849344 + 131072) / 1e12 = 0.015009980416 s
#   linear FLOPs = 2 x 7504924672 = 15009849344 (body 2 x (7504924672 - 525336576) + head)
#   GEMM FLOPs leave out the norm weights (32 x 2 x 4096 + 4096 = 266240 params):
#     2 x (7504924672 - 266240) = 15009316864
#   attention: 1 pair x 32 layers x 4 x 32 heads x 128 = 524288 FLOPs
#   compute = (15009316864 + 524288) / 1e15 = 1.5009841152e-5 s
#   latency = 32 layers x 1e-6 = 3.2e-5 s
#   overlap 0: every kernel is memory-bound, time = latency + memory;
#   overlap 1: nothing hidden, time = latency + memory + compute.
MEMORY_S = 0.015009980416
COMPUTE_S = 1.5009841152e-5
LATENCY_S = 3.2e-5


@pytest.mark.parametrize(
    ("overlap", "time_s"),
    [
        (0.0, LATENCY_S + MEMORY_S),  # 0.015041980416
        (1.0, LATENCY_S + MEMORY_S + COMPUTE_S),  # 0.015056990257152
    ],
)
def test_full_step_by_hand(overlap, time_s):
    dep = plan_deployment(round_h100(overlap), load_model("llama-3.1-8b"), devices=1)
    cost = StepModel(dep).step_cost(Batch(decode_contexts=(0,)))
    assert cost.weight_bytes == pytest.approx(15_009_849_344, rel=1e-12)
    assert cost.kv_bytes == pytest.approx(131_072, rel=1e-12)
    assert cost.flops == pytest.approx(15_009_849_344 + 524_288, rel=1e-12)
    assert cost.attention_flops == pytest.approx(524_288, rel=1e-12)
    assert cost.memory_s == pytest.approx(MEMORY_S, rel=1e-12)
    assert cost.compute_s == pytest.approx(COMPUTE_S, rel=1e-12)
    assert cost.latency_s == pytest.approx(LATENCY_S, rel=1e-12)
    assert (cost.comm_s, cost.stream_s, cost.link_bytes) == (0.0, 0.0, 0.0)
    assert cost.time_s == pytest.approx(time_s, rel=1e-12)
    assert cost.bound is Bound.MEMORY
    assert cost.tokens == 1.0
    # energy: (15009849344 + 131072) B x 8 x 4.25 pJ/bit + 280 W static x time
    energy = 15_009_980_416 * 8 * 4.25e-12 + 280.0 * time_s
    assert cost.energy_j == pytest.approx(energy, rel=1e-12)


def test_tensor_parallel_comm_by_hand():
    # 70B on 4 x h100 (TP4), batch 1: per all-reduce each device sends 2 x 3/4 x 8192 x 2 B
    # = 24576 B; 2 per layer x 80 layers x (5e-6 + 24576 / 450e9) s
    dep = plan_deployment(load_hardware("h100-sxm"), load_model("llama-3.1-70b"), devices=4)
    assert (dep.tensor_parallel, dep.pipeline_parallel) == (4, 1)
    cost = StepModel(dep).step_cost(Batch(decode_contexts=(100,)))
    assert cost.comm_s == pytest.approx(160 * (5e-6 + 24576 / 450e9), rel=1e-12)
    assert cost.link_bytes == pytest.approx(160 * 24576 * 4, rel=1e-12)


def test_pipeline_hops_by_hand():
    # 70B on 4 wafers (PP4), batch 2: 3 hops of 2 x 8192 x 2 B = 32768 B over 150e9 B/s + 5 us
    dep = plan_deployment(load_hardware("wse-3"), load_model("llama-3.1-70b"), devices=4)
    cost = StepModel(dep).step_cost(Batch(decode_contexts=(10, 10)))
    assert cost.comm_s == pytest.approx(3 * (5e-6 + 32768 / 150e9), rel=1e-12)
    assert cost.link_bytes == pytest.approx(3 * 32768, rel=1e-12)


def test_moe_weight_bytes_by_hand():
    # Qwen3-235B, batch 1: reads always-read params plus 94 layers x 8 experts x 3 x 4096 x 1536
    model = load_model("qwen3-235b-a22b")
    dep = plan_deployment(load_hardware("h100-sxm"), model)
    cost = StepModel(dep).step_cost(Batch(decode_contexts=(0,)))
    expected = (model.always_read_params() + 94 * 8 * 3 * 4096 * 1536) * 2
    assert cost.weight_bytes == pytest.approx(expected, rel=1e-12)


# --- sweep agrees with the scalar path ---------------------------------------------------------


@pytest.mark.parametrize(
    ("hardware", "model", "speculative"),
    [
        ("h100-sxm", "llama-3.1-8b", None),
        ("wse-3", "llama-3.1-8b", None),
        ("h100-sxm", "llama-3.1-70b", None),
        ("wse-3", "llama-3.1-70b", None),
        ("h100-sxm", "qwen3-235b-a22b", None),
        ("b200", "gpt-oss-120b", None),
        ("h100-sxm", "llama-3.1-8b", Speculative(draft_tokens=3, acceptance_rate=0.6)),
    ],
)
def test_decode_sweep_equals_step_cost(hardware, model, speculative):
    dep = plan_deployment(load_hardware(hardware), load_model(model), speculative=speculative)
    sm = StepModel(dep)
    batches = np.array([1, 2, 8, 64, 256])
    contexts = np.array([0, 100, 1000, 4000])
    sweep = sm.decode_sweep(batches[:, None], contexts[None, :])
    assert sweep.time_s.shape == (5, 4)
    bounds = sweep.bound_names()
    for i, b in enumerate(batches):
        for j, c in enumerate(contexts):
            exact = sm.step_cost(Batch(decode_contexts=(int(c),) * int(b)))
            assert sweep.time_s[i, j] == pytest.approx(exact.time_s, rel=1e-9)
            assert sweep.energy_j[i, j] == pytest.approx(exact.energy_j, rel=1e-9)
            assert sweep.memory_s[i, j] == pytest.approx(exact.memory_s, rel=1e-9)
            assert sweep.compute_s[i, j] == pytest.approx(exact.compute_s, rel=1e-9)
            assert sweep.comm_s[i, j] == pytest.approx(exact.comm_s, rel=1e-9, abs=1e-15)
            assert bounds[i, j] == exact.bound.value


# --- wave quantisation and split-K ---------------------------------------------------------------


def test_gemm_compute_s_by_hand():
    from memorywall.core.gemm import Gemm, Tiling, gemm_compute_s, split_k_gemms

    tiling = Tiling(units=132, tile_m=128, tile_n=128)
    g = Gemm("o", k=4096, n=4096, count=2)  # 32 column tiles
    unit = 1e12  # FLOP/s per SM
    tile_s = 2 * 128 * 128 * 4096 / unit * 2  # one tile's work, both GEMMs
    # 1 row: 32 tiles < 132 SMs, K split 132 // 32 = 4 ways: a quarter of a tile's work
    assert gemm_compute_s(1, g, tiling, unit) == pytest.approx(tile_s / 4, rel=1e-12)
    assert gemm_compute_s(128, g, tiling, unit) == pytest.approx(tile_s / 4, rel=1e-12)
    # 256 rows: 64 tiles, split 2 ways. 129 rows: the row past the first tile costs its fill
    # (129 / 128 x 32 = 32.25 tiles), not a second padded tile: split 4 ways, as 128 rows.
    assert gemm_compute_s(256, g, tiling, unit) == pytest.approx(tile_s / 2, rel=1e-12)
    assert gemm_compute_s(129, g, tiling, unit) == pytest.approx(tile_s / 4, rel=1e-12)
    # 512 rows: 128 tiles, one wave, no split; 640 rows: 160 tiles, two waves
    assert gemm_compute_s(512, g, tiling, unit) == pytest.approx(tile_s, rel=1e-12)
    assert gemm_compute_s(640, g, tiling, unit) == pytest.approx(2 * tile_s, rel=1e-12)
    assert gemm_compute_s(0, g, tiling, unit) == 0.0
    rows = np.array([0.0, 1.0, 128.0, 129.0, 512.0, 640.0])
    np.testing.assert_allclose(
        gemm_compute_s(rows, g, tiling, unit),
        [gemm_compute_s(float(r), g, tiling, unit) for r in rows],
        rtol=1e-12,
    )
    # Split-K GEMMs run a reduction pass: not for one row, nor past half the SMs in tiles
    # (257 rows: 64.25 tiles at their fill, still under 66; 265 rows: 66.25, past it).
    rows_k = (1, 2, 128, 256, 257, 265)
    assert [split_k_gemms(r, g, tiling) for r in rows_k] == [0, 2, 2, 2, 2, 0]
    np.testing.assert_array_equal(
        split_k_gemms(np.array([1.0, 2.0, 265.0]), g, tiling), [0.0, 2.0, 0.0]
    )


def test_weight_gemms_cover_the_always_read_weights_but_norms():
    from memorywall.core.gemm import weight_gemms

    for name in ("llama-3.1-8b", "llama-3.1-70b", "qwen3-235b-a22b", "deepseek-v3"):
        m = load_model(name)
        norms = m.n_layers * 2 * m.hidden_size + m.hidden_size
        gemm_params = sum(g.params for g in weight_gemms(m, 1))
        # MLA's projections are one GEMM of k = hidden: n rounds down to whole columns.
        rel = 1e-3 if m.mla else 0.0
        assert gemm_params == pytest.approx(m.always_read_params() - norms, rel=rel), name
    # Tensor parallel: column-parallel n and row-parallel k split 4 ways.
    by_name = {g.name: g for g in weight_gemms(load_model("llama-3.1-70b"), 4)}
    assert (by_name["qkv"].k, by_name["qkv"].n) == (8192, (8192 + 2 * 1024) // 4)
    assert (by_name["o"].k, by_name["o"].n) == (8192 // 4, 8192)


def test_decode_attention_streams_cap_the_kv_bandwidth():
    # Batch 1 of Llama 8B: 8 KV-head streams, each at most kv_stream_bytes_per_s.
    hw = load_hardware("h100-sxm")
    sm = StepModel(plan_deployment(hw, load_model("llama-3.1-8b")))
    full = hw.resident.bandwidth_bytes_per_s * hw.efficiency.kv_read
    per = hw.kernels.kv_stream_bytes_per_s
    assert sm._decode_kv_bw(1.0) == pytest.approx(min(full, 8 * per), rel=1e-12)
    assert sm._decode_kv_bw(64.0) == pytest.approx(full, rel=1e-12)
    # Long context at batch 1 reads its KV slower per byte than a full batch does.
    one = sm.step_cost(Batch(decode_contexts=(65536,))).time_s
    short = sm.step_cost(Batch(decode_contexts=(0,))).time_s
    kv_bytes = 65536 * 131072
    assert (one - short) > kv_bytes / full


def test_eager_launch_floor_binds_short_prefills_only():
    # The measured harness's stack: decode replayed from graphs, prefill launched op by op.
    hw = dataclasses.replace(load_hardware("h100-sxm"), execution=ExecutionMode.DECODE_GRAPHS)
    sm = StepModel(plan_deployment(hw, load_model("llama-3.1-8b")))
    floor = 32 * hw.latency.launch_per_layer_s
    assert sm.step_cost(Batch(prefill=(PrefillChunk(16),))).time_s == pytest.approx(floor)
    assert sm.step_cost(Batch(prefill=(PrefillChunk(4096),))).time_s > floor
    # Decode-only steps are replayed from graphs: no launch floor.
    assert sm.step_cost(Batch(decode_contexts=(16,))).time_s < floor
