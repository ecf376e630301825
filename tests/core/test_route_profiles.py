"""The route profiles of issue 29 (TPUs, Maia, AMD, GB200 NVL72, Groq, what-if wafers): figures
as docs/sources/hardware-sources.md gives them, their assumptions stated in `notes`, and every
built-in profile predicting every zoo model that fits it."""

from __future__ import annotations

import math

import pytest

from memorywall.core import Precision, builtin_hardware, builtin_models, load_hardware, load_model
from memorywall.core.deployment import plan_deployment
from memorywall.core.hardware import DeviceKind
from memorywall.core.predict import predict
from memorywall.errors import CapacityError

ROUTES = {
    # name: (kind, resident capacity B, resident bandwidth B/s, bf16 FLOP/s, scale-up B/s per
    #        direction, scale-up domain, TDP W), each from a hardware-sources.md row or a
    #        stated assumption
    "tpu-v5e": (DeviceKind.ASIC, 16e9, 819e9, 197e12, 200e9, 256, 200.0),
    "tpu-v6e": (DeviceKind.ASIC, 32e9, 1.64e12, 918e12, 400e9, 256, 300.0),
    "tpu-v7": (DeviceKind.ASIC, 192e9, 7.3e12, 2.307e15, 600e9, 9216, 1000.0),
    "maia-100": (DeviceKind.ASIC, 64e9, 1.8e12, 0.8e15, 600e9, 4, 700.0),
    "mi300x": (DeviceKind.GPU, 192e9, 5.3e12, 1.3e15, 448e9, 8, 750.0),
    "mi355x": (DeviceKind.GPU, 288e9, 8e12, 2.5e15, 537.6e9, 8, 1400.0),
    "gb200-nvl72": (DeviceKind.GPU, 186e9, 8e12, 2.5e15, 900e9, 72, 1200.0),
    "groq-lpu": (DeviceKind.ASIC, 230e6, 80e12, 188e12, 240e9, 8, 300.0),
    "what-if-sow-hbm": (DeviceKind.WAFER, 3.75e12, 160e12, 18e15, 28.8e12, 1, 10000.0),
    "what-if-wafer-optical": (DeviceKind.WAFER, 44e9, 21e15, 16e15, 26.75e15, 1, 23000.0),
    "what-if-wse-flat-sram": (DeviceKind.WAFER, 44e9, 21e15, 32e15, 26.75e15, 1, 23000.0),
}
ORIGINAL = {"b200", "h100-sxm", "h200", "wse-3"}  # their numbers are the study's; untouched


def test_every_route_is_built_in():
    assert set(ROUTES) | ORIGINAL == set(builtin_hardware())


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_route_figures(name):
    kind, capacity, bandwidth, bf16, scale_up, domain, tdp = ROUTES[name]
    hw = load_hardware(name)
    assert hw.kind is kind
    assert hw.resident.capacity_bytes == capacity
    assert hw.resident.bandwidth_bytes_per_s == bandwidth
    assert hw.peak_flops_per_s[Precision.BF16] == bf16
    assert hw.scale_up.bandwidth_bytes_per_s == scale_up
    assert hw.scale_up_domain == domain
    assert hw.tdp_w == tdp
    assert hw.static_w == pytest.approx(0.4 * tdp)  # the 40% rule of every profile


def test_secondary_figures():
    # fp8 peaks where the row gives them; Ironwood's bf16 is the stated half-of-fp8 assumption
    assert load_hardware("tpu-v7").peak_flops_per_s[Precision.FP8] == 4.614e15
    assert load_hardware("mi355x").peak_flops_per_s[Precision.FP4] == 10e15
    assert load_hardware("gb200-nvl72").peak_flops_per_s[Precision.FP8] == 5e15
    assert load_hardware("mi300x").parallelism.units == 304
    # v5e: 6.4 Tb/s of data-centre network per 256-chip pod = 25 Gb/s per chip
    assert load_hardware("tpu-v5e").external_io.bandwidth_bytes_per_s == 6.4e12 / 8 / 256
    # the optical what-if changes the wafer's I/O (and the stream read through it), nothing else
    wse, optical = load_hardware("wse-3"), load_hardware("what-if-wafer-optical")
    assert optical.external_io.bandwidth_bytes_per_s == 4e12 > wse.external_io.bandwidth_bytes_per_s
    assert optical.external_io.energy_pj_per_bit < wse.external_io.energy_pj_per_bit
    assert optical.stream.bandwidth_bytes_per_s == 4e12
    assert (optical.resident, optical.peak_flops_per_s) == (wse.resident, wse.peak_flops_per_s)
    assert (optical.efficiency, optical.latency) == (wse.efficiency, wse.latency)
    # the flat-SRAM successor: twice the compute, the same SRAM
    flat = load_hardware("what-if-wse-flat-sram")
    assert flat.resident == wse.resident
    assert flat.peak_flops_per_s[Precision.BF16] == 2 * wse.peak_flops_per_s[Precision.BF16]


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_route_states_its_limits_and_source(name):
    hw = load_hardware(name)
    assert hw.source and hw.notes  # what the core cannot represent, said in the profile
    assert hw.what_if is name.startswith("what-if-")
    if hw.what_if:
        assert hw.description.startswith("WHAT-IF:")
        # at least the figures that make it a what-if are labelled as assumptions
        assert any(s.startswith("what-if assumption") for s in hw.sources.values())


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_h100_fitted_constants_are_said_not_measured(name):
    """A profile reusing the H100 fit on another part says so (docs/calibration.md)."""
    hw = load_hardware(name)
    if hw.calibration == "gpu-fit":
        assert any("H100-fitted" in n and "not measured" in n for n in hw.notes), hw.notes
    else:
        assert hw.calibration == "wse-fit" and any("wse-fit" in n for n in hw.notes)


def test_original_profiles_keep_their_figures():
    # the study's four profiles: not what-if, their numbers those test_hardware.py pins
    for name in ORIGINAL:
        assert not load_hardware(name).what_if
    assert load_hardware("b200").resident.bandwidth_bytes_per_s == 8e12
    assert load_hardware("wse-3").peak_flops_per_s == {Precision.BF16: 16e15}


def _fits(hw_name: str, model_name: str):
    try:
        return plan_deployment(load_hardware(hw_name), load_model(model_name))
    except CapacityError:
        return None


@pytest.mark.parametrize("name", builtin_hardware())
def test_every_profile_predicts_every_model_that_fits(name):
    fitted = 0
    for model in builtin_models():
        d = _fits(name, model)
        if d is None:
            continue
        fitted += 1
        p = predict(d, batch=4, context=2048, prompt=512)
        tpot, ttft = p.decode.time_s, p.ttft_s
        assert math.isfinite(tpot) and tpot > 0, (name, model, tpot)
        assert math.isfinite(ttft) and ttft > 0, (name, model, ttft)
        assert math.isfinite(p.energy_j_per_token) and p.energy_j_per_token > 0
    # every profile serves at least the smallest zoo model
    assert fitted >= 1
    assert _fits(name, "llama-3.1-8b") is not None
