"""KV transfer between prefill and decode pools, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from memorywall.core import load_hardware, load_model, plan_deployment
from memorywall.core.kv_transfer import (
    LinkKind,
    LinkPort,
    book,
    kv_link,
    kv_transfer,
    logical_kv_bytes_per_token,
    parse_link,
    transfer_window,
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


# --- transfers sharing the link -------------------------------------------------------------

GB = 1e9


def _book(egress: LinkPort, ingress: LinkPort, start_s: float, size: float, send, receive):
    b = book(
        egress,
        ingress,
        start_s=start_s,
        size_bytes=size,
        send_bytes_per_s=send,
        receive_bytes_per_s=receive,
    )
    egress.add(b)
    ingress.add(b)
    return b


def test_two_transfers_at_once_on_one_link_the_second_takes_twice_as_long():
    egress, ingress = LinkPort(), LinkPort()
    first = _book(egress, ingress, 0.0, 1 * GB, 10 * GB, 10 * GB)  # 100 ms alone
    second = _book(egress, ingress, 0.0, 1 * GB, 10 * GB, 10 * GB)
    assert first.end_s == pytest.approx(0.100)
    assert second.end_s == pytest.approx(0.200)  # waits for the first: FIFO
    assert second.segments[0].start_s == pytest.approx(0.100)
    third = _book(egress, ingress, 0.5, 1 * GB, 10 * GB, 10 * GB)  # after both: idle link
    assert third.end_s == pytest.approx(0.600)


def test_a_later_booking_never_moves_an_earlier_one():
    egress, ingress = LinkPort(), LinkPort()
    first = _book(egress, ingress, 0.0, 1 * GB, 10 * GB, 10 * GB)
    _book(egress, ingress, 0.0, 5 * GB, 10 * GB, 10 * GB)
    assert egress.segments[0] == first.segments[0]


def test_two_slow_senders_into_one_fast_receiver_both_run_at_full_speed():
    """Two 50 GB/s GPUs (each its own egress) into one 150 GB/s wafer ingress."""
    wafer = LinkPort()
    a = _book(LinkPort(), wafer, 0.0, 1 * GB, 50 * GB, 150 * GB)
    b = _book(LinkPort(), wafer, 0.0, 1 * GB, 50 * GB, 150 * GB)
    assert a.end_s == pytest.approx(0.020) and b.end_s == pytest.approx(0.020)


def test_two_100_gbps_senders_into_150_gbps_share_what_is_left():
    """The second gets the 50 GB/s the first leaves for 10 ms (0.5 GB), then 100 GB/s for
    the other 0.5 GB: done at 15 ms."""
    wafer = LinkPort()
    a = _book(LinkPort(), wafer, 0.0, 1 * GB, 100 * GB, 150 * GB)
    b = _book(LinkPort(), wafer, 0.0, 1 * GB, 100 * GB, 150 * GB)
    assert a.end_s == pytest.approx(0.010)
    assert [s.bytes_per_s for s in b.segments] == pytest.approx([50 * GB, 100 * GB])
    assert b.end_s == pytest.approx(0.015)


def test_one_prefill_sending_to_two_decoders_shares_its_egress():
    egress = LinkPort()
    _book(egress, LinkPort(), 0.0, 1 * GB, 10 * GB, 150 * GB)
    second = _book(egress, LinkPort(), 0.0, 1 * GB, 10 * GB, 150 * GB)
    assert second.end_s == pytest.approx(0.200)


def test_a_port_serves_bookings_in_order():
    egress, ingress = LinkPort(), LinkPort()
    _book(egress, ingress, 1.0, 1 * GB, 10 * GB, 10 * GB)
    early = _book(egress, ingress, 0.0, 1 * GB, 10 * GB, 10 * GB)  # booked later: after it
    assert early.start_s == 1.0 and early.end_s == pytest.approx(1.2)
    assert all(s.end_s > 1.0 for s in egress.segments)  # nothing before is kept


def test_random_bookings_conserve_bytes_and_never_overfill_a_port():
    rng = np.random.default_rng(7)
    egresses, ingresses = [LinkPort() for _ in range(3)], [LinkPort() for _ in range(2)]
    caps_e, caps_i = [40 * GB, 50 * GB, 100 * GB], [150 * GB, 60 * GB]
    every: list[tuple[int, int, object]] = []
    t = 0.0
    for _ in range(60):
        t += float(rng.exponential(0.004))
        p, d = int(rng.integers(3)), int(rng.integers(2))
        size = float(rng.uniform(0.01, 1.0)) * GB
        b = _book(egresses[p], ingresses[d], t, size, caps_e[p], caps_i[d])
        assert sum(s.bytes_per_s * (s.end_s - s.start_s) for s in b.segments) == pytest.approx(
            size, rel=1e-9
        )
        assert b.start_s >= t
        every.append((p, d, b))
    for caps, side in ((caps_e, 0), (caps_i, 1)):
        for i, cap in enumerate(caps):
            mine = [s for p, d, b in every if (p, d)[side] == i for s in b.segments]
            for x in sorted({s.start_s for s in mine}):
                held = sum(s.bytes_per_s for s in mine if s.start_s <= x < s.end_s)
                assert held <= cap * (1 + 1e-9)


def test_queued_transfer_counts_its_wait_in_ttft_and_in_its_whole_time():
    a, w = deploy("h100-sxm"), deploy("wse-3")
    link = kv_link(a, w, 10.0)
    egress, ingress = LinkPort(), LinkPort()
    times = []
    for _ in range(2):
        window = transfer_window(a, link, 1000, ready_s=5.0)
        b = window.book(egress, ingress, link)
        egress.add(b)
        ingress.add(b)
        times.append(window.timed(b, link))
    idle = kv_transfer(a, link, 1000)
    wire = 131_072_000 / 10e9
    assert times[0] == idle and times[0].wait_s == 0
    assert times[1].wait_s == pytest.approx(wire)
    assert times[1].exposed_s == pytest.approx(link.latency_s + 2 * wire)
    assert times[1].time_s == pytest.approx(idle.time_s + wire)


def test_layer_overlap_window_on_an_idle_link_matches_the_formula():
    a, w = deploy("h100-sxm"), deploy("wse-3")
    link = kv_link(a, w, 10.0)
    for prefill_s in (1.0, 0.0032):
        window = transfer_window(
            a, link, 1000, ready_s=2.0, prefill_s=prefill_s, layer_overlap=True
        )
        t = window.timed(window.book(LinkPort(), LinkPort(), link), link)
        formula = kv_transfer(a, link, 1000, prefill_s=prefill_s, layer_overlap=True)
        assert t.exposed_s == pytest.approx(formula.exposed_s) and t.wait_s == 0
