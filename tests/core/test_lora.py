"""LoRA in the core: adapter sizes from the model's shape, load time, the step term."""

from __future__ import annotations

import pytest

from memorywall.core import Precision, load_hardware, load_model, plan_deployment
from memorywall.core.lora import (
    LoraAdapter,
    LoraCost,
    adapter_params,
    module_shape,
    target_modules,
)
from memorywall.errors import ConfigError

LLAMA_8B = load_model("llama-3.1-8b")  # h 4096, 32 heads of 128, 8 KV heads, 14336 MLP, 32 layers


def _adapter(rank: int = 16, modules=("q_proj", "v_proj"), lora_id: int = 1) -> LoraAdapter:
    return LoraAdapter(
        name=f"a{lora_id}",
        lora_id=lora_id,
        rank=rank,
        target_modules=modules,
        params=adapter_params(LLAMA_8B, rank, modules),
    )


def test_params_by_hand_for_llama_8b():
    # q_proj 4096 -> 4096, v_proj 4096 -> 1024; r = 16; 32 layers.
    assert adapter_params(LLAMA_8B, 16, ["q_proj", "v_proj"]) == 16 * (8192 + 5120) * 32
    # gate/up 4096 -> 14336 and down 14336 -> 4096: each r * 18432 per layer.
    assert adapter_params(LLAMA_8B, 8, ["gate_proj", "up_proj", "down_proj"]) == 8 * 3 * 18432 * 32
    assert _adapter().bytes == 16 * 13312 * 32 * 2  # bf16


def test_fused_modules_equal_their_parts():
    split = adapter_params(LLAMA_8B, 8, ["q_proj", "k_proj", "v_proj"])
    fused = adapter_params(LLAMA_8B, 8, ["qkv_proj"])
    # A fused module has one A (in -> r) where the parts have three.
    assert split - fused == 2 * 8 * 4096 * 32
    assert module_shape(LLAMA_8B, "gate_up_proj") == (4096, 2 * 14336, 32)


def test_target_modules_forms_and_errors():
    assert target_modules(["q_proj", "q_proj", "v_proj"]) == ("q_proj", "v_proj")
    assert target_modules("all-linear") == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    with pytest.raises(ConfigError, match="lm_head not modelled"):
        target_modules(["q_proj", "lm_head"])
    with pytest.raises(ConfigError, match="expected a list"):
        target_modules(None)
    with pytest.raises(ConfigError, match="r: must be >= 1"):
        adapter_params(LLAMA_8B, 0, ["q_proj"])


def test_mla_attention_refused():
    with pytest.raises(ConfigError, match="MLA"):
        adapter_params(load_model("deepseek-v3"), 8, ["q_proj"])


def test_load_time_is_bytes_over_the_host_link():
    d = plan_deployment(load_hardware("h100-sxm"), LLAMA_8B)
    link = d.hardware.weight_load_link
    a = _adapter()
    expected = a.bytes / d.devices / link.bandwidth_bytes_per_s + link.latency_s
    assert LoraCost(d).load_s(a) == pytest.approx(expected, rel=1e-12)
    # The base weights' rule: 2 x 8.03 B bf16 bytes take the adapter's time x their size.
    base_s = d.weight_load_s - link.latency_s
    assert LoraCost(d).load_s(a) - link.latency_s == pytest.approx(
        base_s * a.bytes / d.weight_bytes, rel=1e-12
    )


def test_step_term_by_hand():
    d = plan_deployment(load_hardware("h100-sxm"), LLAMA_8B)
    hw = d.hardware
    a, b = _adapter(16, lora_id=1), _adapter(64, ("o_proj",), lora_id=2)
    step = LoraCost(d).step([(a, 10), (b, 3)], loads=[b])
    read = (a.params + b.params) * 2.0
    flops = 2.0 * a.params * 10 + 2.0 * b.params * 3
    memory_s = read / (hw.resident.bandwidth_bytes_per_s * hw.efficiency.weight_read)
    compute_s = flops / (hw.peak_flops_per_s[Precision.BF16] * hw.efficiency.compute)
    kernels = max(memory_s, compute_s) + hw.efficiency.overlap * min(memory_s, compute_s)
    load = LoraCost(d).load_s(b)
    assert step.bytes == read
    assert step.flops == flops
    assert step.load_s == pytest.approx(load)
    assert step.time_s == pytest.approx(load + kernels, rel=1e-12)
    # Decode-sized batches read the adapters: memory bound, microseconds on an H100.
    assert memory_s > compute_s
    assert 1e-6 < kernels < 1e-4
    energy = read * 8 * hw.resident.energy_pj_per_bit * 1e-12 + hw.static_w * step.time_s
    assert step.energy_j == pytest.approx(energy, rel=1e-12)


def test_tensor_parallel_splits_the_work():
    hw = load_hardware("h100-sxm")
    one = plan_deployment(hw, LLAMA_8B, devices=1)
    two = plan_deployment(hw, LLAMA_8B, devices=2, tensor_parallel=2)
    a = _adapter()
    assert LoraCost(two).step([(a, 1)]).time_s == pytest.approx(
        LoraCost(one).step([(a, 1)]).time_s / 2, rel=1e-9
    )
