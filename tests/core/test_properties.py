"""Metamorphic properties of the step cost (hypothesis): more work is never faster, more
bandwidth or compute is never slower, energy is positive, smaller weights leave more KV room."""

from __future__ import annotations

import dataclasses
import json
from functools import cache
from importlib import resources

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memorywall.core import (
    Batch,
    Deployment,
    Placement,
    Precision,
    PrefillChunk,
    Speculative,
    StepModel,
    load_hardware,
    load_model,
    model_from_config,
    plan_deployment,
)
from memorywall.core.hardware import Hardware

ZOO = resources.files("memorywall.core") / "models"
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
SLACK = 1 + 1e-12  # float rounding only

# (hardware, model, devices, placement-by-stream, speculative draft tokens)
CASES = [
    ("h100-sxm", "llama-3.1-8b", None, False, None),
    ("h100-sxm", "llama-3.1-70b", 4, False, None),  # tensor parallel
    ("h100-sxm", "llama-3.1-405b", 16, False, None),  # TP8 x PP2
    ("wse-3", "llama-3.1-70b", 4, False, None),  # pipeline over wafers
    ("wse-3", "llama-3.1-8b", 1, True, None),  # weights streamed
    ("h100-sxm", "qwen3-235b-a22b", None, False, None),  # MoE
    ("b200", "gpt-oss-120b", None, False, None),  # MoE + sliding window
    ("h200", "deepseek-v3", None, False, None),  # MLA
    ("h100-sxm", "llama-3.1-8b", None, False, 3),  # speculative
]
case_ids = st.sampled_from(range(len(CASES)))


def deploy(hw: Hardware, i: int) -> Deployment:
    """Case i's deployment on `hw` (the same device count whatever the hardware's numbers)."""
    _, model, devices, stream, draft = CASES[i]
    return plan_deployment(
        hw,
        load_model(model),
        devices=devices,
        placement=Placement.STREAM if stream else Placement.RESIDENT,
        speculative=Speculative(draft_tokens=draft, acceptance_rate=0.7) if draft else None,
    )


@cache
def step_model(i: int) -> StepModel:
    return StepModel(deploy(load_hardware(CASES[i][0]), i))


def decode_time(sm: StepModel, batch: int, context: int) -> float:
    return sm.step_cost(Batch(decode_contexts=(context,) * batch)).time_s


@SETTINGS
@given(case_ids, st.integers(1, 64), st.integers(0, 20_000), st.integers(0, 20_000))
def test_more_context_is_never_faster(i, batch, c1, c2):
    lo, hi = sorted((c1, c2))
    sm = step_model(i)
    assert decode_time(sm, batch, lo) <= decode_time(sm, batch, hi) * SLACK


@SETTINGS
@given(case_ids, st.integers(1, 256), st.integers(1, 256), st.integers(0, 8000))
def test_bigger_batch_is_never_faster(i, b1, b2, context):
    lo, hi = sorted((b1, b2))
    sm = step_model(i)
    assert decode_time(sm, lo, context) <= decode_time(sm, hi, context) * SLACK


@SETTINGS
@given(
    case_ids, st.integers(1, 8192), st.integers(1, 8192), st.integers(0, 4096), st.integers(0, 8)
)
def test_more_prefill_tokens_is_never_faster(i, n1, n2, cached, decodes):
    lo, hi = sorted((n1, n2))
    sm = step_model(i)

    def t(n: int) -> float:
        batch = Batch(decode_contexts=(1000,) * decodes, prefill=(PrefillChunk(n, cached),))
        return sm.step_cost(batch).time_s

    assert t(lo) <= t(hi) * SLACK


@SETTINGS
@given(case_ids, st.floats(1.0, 100.0), st.integers(1, 64), st.integers(0, 8000))
def test_more_memory_bandwidth_is_never_slower(i, factor, batch, context):
    hw = load_hardware(CASES[i][0])
    faster = dataclasses.replace(
        hw,
        resident=dataclasses.replace(
            hw.resident, bandwidth_bytes_per_s=hw.resident.bandwidth_bytes_per_s * factor
        ),
        stream=None
        if hw.stream is None
        else dataclasses.replace(
            hw.stream, bandwidth_bytes_per_s=hw.stream.bandwidth_bytes_per_s * factor
        ),
    )
    base = decode_time(step_model(i), batch, context)
    assert decode_time(StepModel(deploy(faster, i)), batch, context) <= base * SLACK


@SETTINGS
@given(case_ids, st.floats(1.0, 100.0), st.integers(1, 256), st.integers(0, 8000))
def test_more_compute_is_never_slower(i, factor, batch, context):
    hw = load_hardware(CASES[i][0])
    faster = dataclasses.replace(
        hw, peak_flops_per_s={p: v * factor for p, v in hw.peak_flops_per_s.items()}
    )
    base = decode_time(step_model(i), batch, context)
    assert decode_time(StepModel(deploy(faster, i)), batch, context) <= base * SLACK


@cache
def big_h100() -> Hardware:
    """h100-sxm with room for any layer count on one device, so the layout never changes."""
    hw = load_hardware("h100-sxm")
    return dataclasses.replace(hw, resident=dataclasses.replace(hw.resident, capacity_bytes=1e15))


@SETTINGS
@given(
    st.sampled_from(["llama-3.1-8b", "qwen3-32b", "deepseek-v3"]),
    st.integers(1, 40),
    st.integers(1, 32),
    st.integers(0, 8000),
)
def test_more_layers_is_never_faster(name, extra, batch, context):
    config = json.loads((ZOO / f"{name}.json").read_text())
    deeper = dict(config, num_hidden_layers=config["num_hidden_layers"] + extra)
    shallow = model_from_config(config, name=name)
    deep = model_from_config(deeper, name=name)
    assert deep.n_layers == shallow.n_layers + extra
    t_shallow = StepModel(plan_deployment(big_h100(), shallow, devices=1))
    t_deep = StepModel(plan_deployment(big_h100(), deep, devices=1))
    assert decode_time(t_shallow, batch, context) <= decode_time(t_deep, batch, context) * SLACK


@SETTINGS
@given(case_ids, st.integers(0, 32), st.integers(0, 8000), st.integers(0, 2048))
def test_energy_and_time_are_positive(i, decodes, context, prompt):
    batch = Batch(
        decode_contexts=(context,) * decodes,
        prefill=(PrefillChunk(prompt),) if prompt else (),
    )
    cost = step_model(i).step_cost(batch)
    assert cost.time_s > 0
    assert cost.energy_j > 0
    parts = (cost.memory_s, cost.stream_s, cost.compute_s, cost.latency_s, cost.comm_s)
    assert min(parts) >= 0
    # The step waits at least for its binding term plus the floors, and (without drafting,
    # which adds draft steps) at most for every term in turn.
    floor = cost.latency_s + cost.comm_s + max(cost.memory_s + cost.stream_s, cost.compute_s)
    assert cost.time_s * SLACK >= floor
    if CASES[i][4] is None:
        assert cost.time_s <= sum(parts) * SLACK


@pytest.mark.parametrize(
    ("hardware", "model", "devices"),
    [
        ("h100-sxm", "llama-3.1-70b", 4),
        ("b200", "llama-3.1-405b", 8),
        ("wse-3", "llama-3.1-70b", 4),
        ("h200", "qwen3-235b-a22b", 8),
    ],
)
def test_kv_capacity_grows_as_weights_shrink(hardware, model, devices):
    hw, m = load_hardware(hardware), load_model(model)
    capacity = [
        plan_deployment(hw, m, devices=devices, weight_precision=p).kv_capacity_tokens
        for p in (Precision.BF16, Precision.FP8, Precision.FP4)
    ]
    assert 0 < capacity[0] < capacity[1] < capacity[2]
