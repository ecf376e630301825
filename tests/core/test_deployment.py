"""Deployments: the fewest devices that hold a model, layout errors, weight streaming on the wafer,
and KV capacity by hand."""

from __future__ import annotations

import dataclasses

import pytest

from memorywall.core import (
    Batch,
    Bound,
    Placement,
    Precision,
    Speculative,
    StepModel,
    load_hardware,
    load_model,
    model_from_config,
    plan_deployment,
)
from memorywall.core.deployment import DeploymentNames
from memorywall.errors import CapacityError, ConfigError, MemorywallError


@pytest.mark.parametrize(
    ("hardware", "model", "devices", "tp", "pp"),
    [
        ("wse-3", "llama-3.1-8b", 1, 1, 1),
        # 70B: 141.1 GB / (44 GB x 0.9 x 0.9 = 35.64 GB) = 3.96 -> 4 wafers, as Cerebras serves it
        ("wse-3", "llama-3.1-70b", 4, 1, 4),
        ("h100-sxm", "llama-3.1-8b", 1, 1, 1),
        # 70B: 141.1 GB / (80 GB x 0.81 = 64.8 GB) = 2.2 -> 3, not a power of two -> 4
        ("h100-sxm", "llama-3.1-70b", 4, 4, 1),
        # 405B: 811.7 GB / 64.8 GB = 12.5 -> 13; 13..15 are not multiples of TP8 -> 16 = TP8 x PP2
        ("h100-sxm", "llama-3.1-405b", 16, 8, 2),
        ("h200", "llama-3.1-70b", 2, 2, 1),
        ("b200", "llama-3.1-405b", 8, 8, 1),
    ],
)
def test_auto_device_count(hardware, model, devices, tp, pp):
    d = plan_deployment(load_hardware(hardware), load_model(model))
    assert (d.devices, d.tensor_parallel, d.pipeline_parallel) == (devices, tp, pp)
    assert d.weight_precision is Precision.BF16 and d.placement is Placement.RESIDENT


def test_explicit_too_few_devices():
    with pytest.raises(CapacityError, match=r"needs at least 4 x h100-sxm") as e:
        plan_deployment(load_hardware("h100-sxm"), load_model("llama-3.1-70b"), devices=1)
    assert "1 given" in str(e.value)
    with pytest.raises(CapacityError, match=r"needs at least 4 x wse-3"):
        plan_deployment(load_hardware("wse-3"), load_model("llama-3.1-70b"), devices=2)


def test_explicit_more_devices_than_needed():
    d = plan_deployment(load_hardware("h100-sxm"), load_model("llama-3.1-8b"), devices=8)
    assert (d.devices, d.tensor_parallel, d.pipeline_parallel) == (8, 8, 1)


def test_tensor_parallel_not_a_power_of_two():
    with pytest.raises(ConfigError, match="tensor parallel 3 must be a power of two"):
        plan_deployment(load_hardware("h100-sxm"), load_model("llama-3.1-8b"), devices=3)


def test_tensor_parallel_not_dividing_heads():
    config = {
        "num_hidden_layers": 4,
        "hidden_size": 768,
        "num_attention_heads": 6,
        "intermediate_size": 3072,
        "vocab_size": 1000,
        "max_position_embeddings": 2048,
    }
    model = model_from_config(config, name="six-heads")
    with pytest.raises(ConfigError, match="dividing 6 attention heads"):
        plan_deployment(load_hardware("h100-sxm"), model, devices=4)


def test_devices_not_a_multiple_of_the_scale_up_domain():
    with pytest.raises(ConfigError, match="12 is not a multiple of the tensor-parallel size 8"):
        plan_deployment(load_hardware("h100-sxm"), load_model("llama-3.1-8b"), devices=12)


def test_more_pipeline_stages_than_layers():
    model = model_from_config(
        {
            "num_hidden_layers": 2,
            "hidden_size": 256,
            "num_attention_heads": 4,
            "intermediate_size": 512,
            "vocab_size": 100,
            "max_position_embeddings": 128,
        },
        name="tiny",
    )
    with pytest.raises(ConfigError, match="3 pipeline stages exceed 2 layers"):
        plan_deployment(load_hardware("wse-3"), model, devices=3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"devices": 0},
        {"memory_utilization": 0.0},
        {"memory_utilization": 1.5},
        {"kv_reserve_fraction": 1.0},
        {"kv_reserve_fraction": -0.1},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        plan_deployment(load_hardware("h100-sxm"), load_model("llama-3.1-8b"), **kwargs)


def test_stream_placement_on_a_gpu():
    with pytest.raises(ConfigError, match="h100-sxm has no external weight store"):
        plan_deployment(
            load_hardware("h100-sxm"), load_model("llama-3.1-8b"), placement=Placement.STREAM
        )


def test_placement_parse():
    assert Placement.parse("sram") is Placement.RESIDENT
    assert Placement.parse("hbm") is Placement.RESIDENT
    assert Placement.parse("stream") is Placement.STREAM
    with pytest.raises(ConfigError, match="placement: unknown 'disk'"):
        Placement.parse("disk")


def test_stream_placement_on_wafer_is_interconnect_bound():
    hw, model = load_hardware("wse-3"), load_model("llama-3.1-8b")
    streamed = plan_deployment(hw, model, placement=Placement.STREAM)
    resident = plan_deployment(hw, model)
    assert streamed.devices == 1
    assert streamed.resident_weight_bytes == 0.0
    assert streamed.kv_capacity_tokens > resident.kv_capacity_tokens
    batch = Batch(decode_contexts=(1024,))
    s = StepModel(streamed).step_cost(batch)
    r = StepModel(resident).step_cost(batch)
    assert s.bound is Bound.INTERCONNECT
    # 15.0 GB over min(MemoryX 150e9, I/O 150e9 B/s) = 0.100 s
    assert s.stream_s == pytest.approx(s.weight_bytes / 150e9, rel=1e-12)
    assert s.stream_s == pytest.approx(15_009_849_344 / 150e9, rel=1e-12)
    assert s.time_s / r.time_s > 50
    tiers = StepModel(streamed).bytes_by_tier(s)
    assert tiers["memoryx"] == s.weight_bytes and tiers["sram"] == s.kv_bytes


def test_stream_too_big_for_the_store():
    hw = load_hardware("wse-3")
    small = dataclasses.replace(hw, stream=dataclasses.replace(hw.stream, capacity_bytes=1e9))
    with pytest.raises(CapacityError, match="exceed the memoryx store"):
        plan_deployment(small, load_model("llama-3.1-8b"), placement=Placement.STREAM)


@pytest.mark.parametrize(
    ("hardware", "model", "devices"),
    [
        ("h100-sxm", "llama-3.1-8b", 1),
        ("h100-sxm", "llama-3.1-70b", 8),
        ("wse-3", "llama-3.1-70b", 4),
        ("h200", "deepseek-v3", 8),
    ],
)
def test_kv_capacity_by_hand(hardware, model, devices):
    hw, m = load_hardware(hardware), load_model(model)
    d = plan_deployment(hw, m, devices=devices, weight_precision=Precision.FP8)
    usable = devices * hw.resident.capacity_bytes * 0.9
    weights = m.total_params() * 1  # fp8: one byte per weight
    tp = d.tensor_parallel
    # KV is split over min(tp, kv heads) and replicated over the rest of the TP group
    per_token = m.n_layers * m.kv_values_per_token_per_layer() * 2 * tp / min(tp, m.n_kv_heads)
    assert d.kv_bytes_per_token == per_token
    assert d.kv_capacity_tokens == int((usable - weights) / per_token)


def test_kv_capacity_llama8b_h100_number():
    # (80e9 x 0.9 - 8030261248 x 2) / 131072 = 55939477504 / 131072 = 426784.3 -> 426784
    d = plan_deployment(load_hardware("h100-sxm"), load_model("llama-3.1-8b"))
    assert d.kv_capacity_tokens == 426_784


def test_mla_cache_is_replicated_across_tensor_parallel():
    d = plan_deployment(
        load_hardware("h200"), load_model("deepseek-v3"), devices=8, weight_precision=Precision.FP8
    )
    assert d.kv_shards == 1
    assert d.kv_bytes_per_token == 70_272 * 8


def test_fp8_and_fp4_weight_bytes():
    hw, m = load_hardware("b200"), load_model("llama-3.1-70b")
    bf16 = plan_deployment(hw, m, devices=2).weight_bytes
    fp8 = plan_deployment(hw, m, devices=2, weight_precision=Precision.FP8).weight_bytes
    fp4 = plan_deployment(hw, m, devices=2, weight_precision=Precision.FP4).weight_bytes
    assert bf16 == m.total_params() * 2
    assert fp8 == bf16 / 2
    assert fp4 == pytest.approx(bf16 * 4.5 / 16, rel=1e-12)  # NVFP4: 4.5 bits per value


def test_fp8_kv_halves_kv_bytes_per_token():
    hw, m = load_hardware("h100-sxm"), load_model("llama-3.1-8b")
    bf16 = plan_deployment(hw, m)
    fp8 = plan_deployment(hw, m, kv_precision=Precision.FP8)
    assert fp8.kv_bytes_per_token == bf16.kv_bytes_per_token / 2


def test_fp8_needs_fewer_devices():
    hw, m = load_hardware("h100-sxm"), load_model("llama-3.1-70b")
    assert plan_deployment(hw, m, weight_precision=Precision.FP8).devices == 2


def test_draft_model_weights_count():
    hw = load_hardware("h100-sxm")
    target, draft = load_model("llama-3.1-70b"), load_model("llama-3.1-8b")
    spec = Speculative(draft_tokens=4, acceptance_rate=0.7, draft_model=draft)
    d = plan_deployment(hw, target, devices=4, speculative=spec)
    assert d.weight_bytes == (target.total_params() + draft.total_params()) * 2


def test_describe():
    d = plan_deployment(load_hardware("h100-sxm"), load_model("llama-3.1-405b"))
    assert (
        d.describe()
        == "llama-3.1-405b on 16 x h100-sxm (TP8 x PP2, weights bf16 resident, KV bf16)"
    )


def test_explicit_tensor_parallel_picks_one_of_the_layouts():
    h100, m = load_hardware("h100-sxm"), load_model("llama-3.1-70b")
    d = plan_deployment(h100, m, devices=8, tensor_parallel=2)
    assert (d.tensor_parallel, d.pipeline_parallel) == (2, 4)
    assert d == dataclasses.replace(
        plan_deployment(h100, m, devices=8), tensor_parallel=2, pipeline_parallel=4
    )
    with pytest.raises(ConfigError, match=r"tensor_parallel: 3 does not split 8 x h100-sxm .*"
                       r"valid: TP1 x PP8, TP2 x PP4, TP4 x PP2, TP8 x PP1"):  # fmt: skip
        plan_deployment(h100, m, devices=8, tensor_parallel=3)
    with pytest.raises(ConfigError, match="tensor_parallel: needs devices"):
        plan_deployment(h100, m, tensor_parallel=2)


def test_names_build_what_plan_deployment_builds_speculative_and_split_included():
    names = DeploymentNames(
        hardware="h100-sxm",
        model="llama-3.1-70b",
        devices=8,
        weight_precision="fp8",
        draft_tokens=3,
        acceptance=0.6,
        draft_model="llama-3.1-8b",
        tensor_parallel=4,
    )
    d = names.build()
    assert d == plan_deployment(
        load_hardware("h100-sxm"),
        load_model("llama-3.1-70b"),
        devices=8,
        weight_precision=Precision.FP8,
        speculative=Speculative(
            draft_tokens=3, acceptance_rate=0.6, draft_model=load_model("llama-3.1-8b")
        ),
        tensor_parallel=4,
    )
    assert (d.tensor_parallel, d.pipeline_parallel) == (4, 2)
    # Names of a built deployment rebuild it: devices, split and speculation kept.
    assert DeploymentNames.of(d).build() == d
    assert DeploymentNames(hardware="wse-3", model="llama-3.1-8b").build() == plan_deployment(
        load_hardware("wse-3"), load_model("llama-3.1-8b")
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hardware": "abacus"}, "unknown hardware 'abacus'"),
        ({"weight_precision": "fp3"}, "precision: 'fp3' is not a valid Precision"),
        ({"placement": "disk"}, "placement: unknown 'disk'"),
        ({"draft_model": "llama-3.1-8b"}, "draft_model: needs draft_tokens"),
        ({"draft_tokens": 0}, "draft_tokens: must be >= 1"),
    ],
)
def test_bad_names_are_one_line(kwargs, message):
    with pytest.raises(MemorywallError, match=message):
        DeploymentNames(**{"hardware": "wse-3", "model": "llama-3.1-8b", **kwargs}).build()
