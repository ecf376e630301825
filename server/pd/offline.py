"""Split and aggregated fleets on a virtual clock, for a given schedule of requests.

`PdFleet` names a split fleet: x prefill workers, y decode workers, the link.
`simulate_pd` runs requests through it (`cosim.PdOfflineEngine`: the live path
without sockets or sleeping, workers round robin as smg's `round_robin` sends
them); `simulate_aggregated` runs the same requests on workers that serve both
phases, so the two are compared on one code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from memorywall.core.deployment import Deployment
from memorywall.core.kv_transfer import KvTransfer, LinkKind
from memorywall.server.engine.build import build_core
from memorywall.server.engine.offline import OfflineEngine, Timeline
from memorywall.server.engine.scheduler import EngineConfig, Request
from memorywall.server.pd.cosim import PdOfflineEngine

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
    """One request through the split fleet: what its client sees, and its prefill side."""

    timeline: Timeline  # from its arrival at the fleet to its last token
    prefill_end_s: float | None  # None: refused by the prefill worker (`timeline.error`)
    transfer: KvTransfer | None

    @property
    def landed_s(self) -> float | None:
        """When its KV reached the decode worker."""
        if self.prefill_end_s is None or self.transfer is None:
            return None
        return self.prefill_end_s + self.transfer.exposed_s


def simulate_pd(fleet: PdFleet, requests: Sequence[tuple[float, Request]]) -> list[PdTimeline]:
    """Run `(arrival_s, request)` pairs through `fleet`; one timeline each, in order."""
    engine = PdOfflineEngine(fleet)
    for arrival_s, r in requests:
        engine.submit(r, arrival_s)
    engine.run()
    out = []
    for _, r in requests:
        phase = engine.phases[r.request_id]
        out.append(
            PdTimeline(
                timeline=engine.timelines[r.request_id],
                prefill_end_s=phase.prefill_end_s,
                transfer=phase.transfer,
            )
        )
    return out


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
