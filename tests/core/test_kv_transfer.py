"""KV transfer between prefill and decode pools, against hand-computed values."""

from __future__ import annotations

import pytest

from memorywall.core import load_hardware, load_model, plan_deployment
from memorywall.core.kv_transfer import (
    LinkKind,
    kv_link,
    kv_transfer,
    logical_kv_bytes_per_token,
    parse_link,
)
from memorywall.errors import ConfigError


def deploy(hw: str, model: str = "llama-3.1-8b", devices: int | None = None):
    return plan_deployment(load_hardware(hw), load_model(model), devices=devices)


def test_llama_8b_kv_is_128_kib_per_token_at_bf16():
    # hardware-sources.md: 2 (K, V) x 32 layers x 8 heads x 128 x 2 bytes = 131,072
    assert logical_kv_bytes_per_token(deploy("h100-sxm")) == 131_072


def test_h100_to_wse3_over_nics_is_paced_by_the_smaller_aggregate():
    h100, wse = deploy("h100-sxm", devices=2), deploy("wse-3")
    link = kv_link(h100, wse)
    # 2 x 50 GB/s (one 400 Gb/s NIC per GPU) against one CS-3's 150 GB/s
    assert link.kind is LinkKind.NIC
    assert link.bandwidth_bytes_per_s == pytest.approx(100e9)
    assert link.latency_s == pytest.approx(5e-6)
    t = kv_transfer(h100, link, 1000)
    assert t.bytes == 131_072_000
    assert t.time_s == pytest.approx(5e-6 + 131_072_000 / 100e9)  # 1.3157 ms
    assert t.exposed_s == t.time_s


def test_wafer_io_limits_a_gpu_pool_with_more_nics():
    b200, wse = deploy("b200", devices=8), deploy("wse-3")
    link = kv_link(b200, wse)
    assert link.bandwidth_bytes_per_s == pytest.approx(150e9)  # the CS-3's 12 x 100 GbE


def test_nvlink_within_one_domain_and_refused_across_kinds():
    a, b = deploy("h100-sxm", devices=1), deploy("h100-sxm", devices=1)
    link = kv_link(a, b, LinkKind.NVLINK)
    assert link.bandwidth_bytes_per_s == pytest.approx(450e9)  # 900 GB/s bidirectional / 2
    with pytest.raises(ConfigError, match="not one scale-up domain"):
        kv_link(a, deploy("wse-3"), LinkKind.NVLINK)


def test_user_given_bandwidth():
    a, w = deploy("h100-sxm"), deploy("wse-3")
    link = kv_link(a, w, parse_link("25"))
    assert link.kind is LinkKind.CUSTOM and link.bandwidth_bytes_per_s == 25e9
    assert kv_transfer(a, link, 0).time_s == pytest.approx(link.latency_s)


def test_layer_overlap_exposes_only_what_outlasts_the_prefill():
    a, w = deploy("h100-sxm"), deploy("wse-3")
    link = kv_link(a, w, 10.0)  # 10 GB/s: 13.1 ms of wire time for 1000 tokens
    wire = 131_072_000 / 10e9
    long_prefill = kv_transfer(a, link, 1000, prefill_s=1.0, layer_overlap=True)
    assert long_prefill.exposed_s == pytest.approx(link.latency_s + wire / 32)  # last layer
    short_prefill = kv_transfer(a, link, 1000, prefill_s=0.0032, layer_overlap=True)
    assert short_prefill.exposed_s == pytest.approx(link.latency_s + wire - 0.0032 * 31 / 32)
    assert short_prefill.time_s == pytest.approx(link.latency_s + wire)


@pytest.mark.parametrize("text", ["", "fast", "-1", "0", "inf", "nan"])
def test_bad_link_is_a_config_error(text):
    with pytest.raises(ConfigError, match="--kv-link"):
        parse_link(text)
