"""Disaggregated serving on a virtual clock: x prefill engines, y decode engines, one link.

The live path in one pass, without sockets or sleeping: each request prefills on
a prefill engine (a one-token request, as `halves.PrefillHalf` submits it), its
KV crosses the link (`core.kv_transfer`, from the prefill's end), and it decodes
on a decode engine from the moment the KV lands, with its prompt's KV in place
(`Request.kv_transferred`). Requests go to workers round robin, as smg's
`round_robin` policy sends them. A prefill worker's work never waits on the
decode side (it frees its KV when the prefill ends), so every prefill engine runs
first and then every decode engine: exact for an open-loop schedule.

`simulate_aggregated` runs the same requests on workers that serve both phases,
so a split and an aggregated fleet are compared on one code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from memorywall.core.deployment import Deployment
from memorywall.core.kv_transfer import KvTransfer, LinkKind, kv_link, kv_transfer
from memorywall.server.engine.build import build_core
from memorywall.server.engine.offline import OfflineEngine, Timeline
from memorywall.server.engine.scheduler import EngineConfig, Request

__all__ = ["PdFleet", "PdTimeline", "simulate_aggregated", "simulate_pd"]


@dataclass(frozen=True, kw_only=True)
class PdFleet:
    """`prefill_workers` workers of `prefill`, `decode_workers` of `decode`, and the link."""

    prefill: Deployment
    prefill_workers: int
    decode: Deployment
    decode_workers: int
    link: LinkKind | float = LinkKind.NIC
    layer_overlap: bool = False
    engine: EngineConfig = field(default_factory=EngineConfig)

    @property
    def devices(self) -> int:
        return (
            self.prefill_workers * self.prefill.devices + self.decode_workers * self.decode.devices
        )

    @property
    def power_w(self) -> float:
        """Rated power (TDP) of every device in the fleet."""
        p, d = self.prefill, self.decode
        return (
            self.prefill_workers * p.devices * p.hardware.tdp_w
            + self.decode_workers * d.devices * d.hardware.tdp_w
        )

    def describe(self) -> str:
        return (
            f"{self.prefill_workers}P x {self.prefill.devices} {self.prefill.hardware.name} + "
            f"{self.decode_workers}D x {self.decode.devices} {self.decode.hardware.name}"
        )


@dataclass(frozen=True, kw_only=True)
class PdTimeline:
    """One request through the split fleet; `decode` holds its tokens (its `arrival_s` is
    when the KV landed), `arrival_s` when it reached the fleet."""

    arrival_s: float
    prefill_end_s: float
    transfer: KvTransfer | None  # None: refused by the prefill worker (`decode.error`)
    decode: Timeline


def simulate_pd(fleet: PdFleet, requests: Sequence[tuple[float, Request]]) -> list[PdTimeline]:
    """Run `(arrival_s, request)` pairs through `fleet`; one timeline each, in order."""
    prefills = [
        OfflineEngine(build_core(fleet.prefill, fleet.engine)[0])
        for _ in range(fleet.prefill_workers)
    ]
    for i, (arrival_s, r) in enumerate(requests):
        prefill = replace(r, max_tokens=1, min_tokens=0)
        prefills[i % len(prefills)].submit(prefill, arrival_s)
    for engine in prefills:
        engine.run()
    link = kv_link(fleet.prefill, fleet.decode, fleet.link)
    decodes = [
        OfflineEngine(build_core(fleet.decode, fleet.engine)[0])
        for _ in range(fleet.decode_workers)
    ]
    transfers: list[tuple[float, KvTransfer | None]] = []
    refused: dict[int, Timeline] = {}
    for i, (arrival_s, r) in enumerate(requests):
        p = _timeline(prefills[i % len(prefills)], r.request_id)
        if p.error is not None:
            refused[i] = p  # as the live prefill half ends: at arrival, with its error
            transfers.append((arrival_s, None))
            continue
        end_s = p.first_token_s
        prefill_s = end_s - (p.first_scheduled_s or p.arrival_s)
        t = kv_transfer(
            fleet.prefill,
            link,
            len(r.prompt_ids),
            prefill_s=prefill_s,
            layer_overlap=fleet.layer_overlap,
        )
        decodes[i % len(decodes)].submit(replace(r, kv_transferred=True), end_s + t.exposed_s)
        transfers.append((end_s, t))
    for engine in decodes:
        engine.run()
    return [
        PdTimeline(
            arrival_s=arrival_s,
            prefill_end_s=end_s,
            transfer=t,
            decode=refused.get(i) or _timeline(decodes[i % len(decodes)], r.request_id),
        )
        for i, ((arrival_s, r), (end_s, t)) in enumerate(zip(requests, transfers, strict=True))
    ]


def simulate_aggregated(
    deployment: Deployment,
    workers: int,
    requests: Sequence[tuple[float, Request]],
    engine: EngineConfig | None = None,
) -> list[Timeline]:
    """The same requests, round robin over `workers` workers that serve both phases."""
    engines = [
        OfflineEngine(build_core(deployment, engine or EngineConfig())[0]) for _ in range(workers)
    ]
    for i, (arrival_s, r) in enumerate(requests):
        engines[i % workers].submit(r, arrival_s)
    for e in engines:
        e.run()
    return [_timeline(engines[i % workers], r.request_id) for i, (_, r) in enumerate(requests)]


def _timeline(engine: OfflineEngine, request_id: str) -> Timeline:
    timeline = engine.timelines.get(request_id)
    if timeline is not None:
        return timeline
    return next(t for t in engine.refused if t.request_id == request_id)
