"""Expert parallelism: the all-to-all terms against a hand computation, the layout's checks,
and the step model's hook (the MoE all-reduce replaced, the expert reads per device)."""

from __future__ import annotations

import pytest

from memorywall.core import Batch, PrefillChunk, StepModel, load_hardware, load_model
from memorywall.core.deployment import DeploymentNames, plan_deployment
from memorywall.core.expert_parallel import ExpertParallel, distinct_experts
from memorywall.core.precision import Precision
from memorywall.errors import ConfigError

NVL72 = load_hardware("gb200-nvl72")
GPT_OSS = load_model("gpt-oss-120b")  # 36 MoE layers, 128 experts, top-4, hidden 2880


def test_all_to_all_by_hand():
    ep = ExpertParallel.of(GPT_OSS, 8, NVL72.scale_up)
    # 64 tokens over 8 devices: 8 each, 4 copies each, 2880 bf16 values, 7/8 leave.
    per_device = 64 / 8 * 4 * 2880 * 2 * 7 / 8
    assert per_device == 161_280.0
    assert ep.all_to_all_bytes_per_device(64.0) == pytest.approx(per_device, rel=1e-12)
    # NVLink 5: 900 GB/s per direction, 5 us a collective.
    one = 5e-6 + 161_280 / 900e9
    assert ep.all_to_all_s(64.0) == pytest.approx(one, rel=1e-12)
    assert ep.comm_s(64.0) == pytest.approx(2 * 36 * one, rel=1e-12)  # dispatch + combine
    assert ep.link_bytes(64.0) == pytest.approx(2 * 36 * 8 * per_device, rel=1e-12)
    assert ep.experts_per_device == 16
    # One token hits 4 experts: half a one on each of 8 devices.
    assert ep.experts_read_per_device(1.0) == pytest.approx(0.5, rel=1e-12)
    assert ep.experts_read_per_device(1.0) == pytest.approx(
        distinct_experts(128, 4, 1.0) / 8, rel=1e-12
    )


def test_one_device_sends_nothing():
    ep = ExpertParallel.of(GPT_OSS, 1, NVL72.scale_up)
    assert ep.all_to_all_bytes_per_device(64.0) == 0.0


def _pair(tokens: int):
    kw = dict(devices=8, weight_precision=Precision.FP8)
    tp = plan_deployment(NVL72, GPT_OSS, tensor_parallel=8, **kw)
    ep = plan_deployment(NVL72, GPT_OSS, expert_parallel=8, **kw)
    batch = Batch(prefill=(PrefillChunk(tokens),))
    return StepModel(tp).step_cost(batch), StepModel(ep).step_cost(batch), tp, ep


def test_step_replaces_the_moe_all_reduce_with_two_all_to_alls():
    t, e, tp, ep = _pair(64)
    assert (tp.tensor_parallel, ep.tensor_parallel, ep.expert_parallel) == (8, 8, 8)
    # Ring all-reduce: 2 x 7/8 of 64 x 2880 bf16 values per device.
    reduce_s = 5e-6 + 2 * 7 / 8 * 64 * 2880 * 2 / 900e9
    all_to_all_s = 5e-6 + 161_280 / 900e9
    assert e.comm_s - t.comm_s == pytest.approx(36 * (2 * all_to_all_s - reduce_s), rel=1e-9)
    reduce_bytes = 2 * 7 / 8 * 64 * 2880 * 2 * 8
    assert e.link_bytes - t.link_bytes == pytest.approx(
        36 * (2 * 8 * 161_280 - reduce_bytes), rel=1e-9
    )
    # Same expert bytes read in all: the tokens' experts, whole, spread over the group.
    assert e.weight_bytes == pytest.approx(t.weight_bytes, rel=1e-12)
    assert e.memory_s == pytest.approx(t.memory_s, rel=1e-9)


def test_ep_one_is_the_tensor_parallel_step_bit_for_bit():
    d = plan_deployment(NVL72, GPT_OSS, devices=8, expert_parallel=1)
    base = plan_deployment(NVL72, GPT_OSS, devices=8)
    batch = Batch(prefill=(PrefillChunk(100),))
    assert StepModel(d).step_cost(batch) == StepModel(base).step_cost(batch)


def test_default_devices_fill_the_ep_group():
    d = plan_deployment(NVL72, GPT_OSS, weight_precision=Precision.FP8, expert_parallel=16)
    assert (d.devices, d.tensor_parallel, d.pipeline_parallel) == (16, 16, 1)
    assert "TP16 x EP16" in d.describe()
    names = DeploymentNames(hardware="gb200-nvl72", model="gpt-oss-120b", expert_parallel=16)
    assert names.build().expert_parallel == 16
    assert DeploymentNames.of(d).expert_parallel == 16


@pytest.mark.parametrize(
    ("hardware", "model", "kwargs", "message"),
    [
        ("gb200-nvl72", "llama-3.1-8b", {"expert_parallel": 2}, "has no routed experts"),
        ("gb200-nvl72", "gpt-oss-120b", {"expert_parallel": 3}, "does not divide"),
        ("h100-sxm", "gpt-oss-120b", {"expert_parallel": 16}, "scale-up domain of 8"),
        ("wse-3", "gpt-oss-120b", {"expert_parallel": 2}, "is a wafer"),
        (
            "gb200-nvl72",
            "gpt-oss-120b",
            {"expert_parallel": 4, "devices": 8, "tensor_parallel": 8},
            "must equal the stage's tensor-parallel group",
        ),
        ("gb200-nvl72", "gpt-oss-120b", {"expert_parallel": 0}, "must be >= 1"),
    ],
)
def test_bad_expert_parallel_is_one_line(hardware, model, kwargs, message):
    with pytest.raises(ConfigError, match=message) as e:
        plan_deployment(load_hardware(hardware), load_model(model), **kwargs)
    assert "\n" not in str(e.value)


def test_predict_takes_ep(capsys):
    from memorywall.cli import main

    argv = ["predict", "--hardware", "gb200-nvl72", "--model", "gpt-oss-120b"]
    assert main([*argv, "--weight-precision", "fp8", "--ep", "8"]) == 0
    assert "8 x gb200-nvl72 (TP8 x EP8," in capsys.readouterr().out


@pytest.mark.parametrize(
    ("ep", "words"), [("0", "--ep: must be >= 1"), ("3", "does not divide"), ("x", "--ep")]
)
def test_bad_ep_is_one_line_exit_2(capsys, ep, words):
    from memorywall.cli import main

    argv = ["predict", "--hardware", "gb200-nvl72", "--model", "gpt-oss-120b", "--ep", ep]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("memorywall: error:") and words in err
