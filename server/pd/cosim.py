"""A split fleet as one offline engine: prefill and decode workers on one virtual clock.

`PdOfflineEngine` has `OfflineEngine`'s surface (`submit`, `on_finish`, `run`,
`now_s`), so a load generator's release rules drive it unchanged, closed loop
included. Inside, each worker is an `EngineCore` with its own clock and arrival
queue, and the engine always runs the step that starts earliest across workers:
a step that ends at t can only cause arrivals at t or later (a decode worker
gets the request when its KV lands, a closed-loop user sends its next request
when its last one ends), so no worker ever plans a step before an arrival that
could still come in before it. Each request prefills on a prefill worker (a
one-token request, as the live prefill half), its KV crosses the link
(`core.kv_transfer`), and it decodes on a decode worker from the moment the KV
lands (`Request.kv_transferred`); workers are taken round robin.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from memorywall.core.kv_transfer import KvTransfer, kv_link, kv_transfer
from memorywall.errors import MemorywallError
from memorywall.server.engine.build import build_core
from memorywall.server.engine.offline import Timeline
from memorywall.server.engine.scheduler import EngineCore, Request, Sequence

if TYPE_CHECKING:
    from memorywall.server.pd.offline import PdFleet

__all__ = ["PdOfflineEngine", "PdPhase"]


@dataclass(slots=True)
class PdPhase:
    """What the prefill side did for one request."""

    prefill_end_s: float | None = None
    transfer: KvTransfer | None = None


class _Worker:
    """One worker's engine core, its clock and its arrivals."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.now_s = 0.0  # end of its last step
        self.arrivals: list[tuple[float, int, Request]] = []

    def next_s(self) -> float:
        """When its next event (a step, or admitting an arrival) starts; inf if none."""
        if self.core.has_work():
            return max(self.now_s, self.core.next_arrival_s())
        return max(self.now_s, self.arrivals[0][0]) if self.arrivals else math.inf


class PdOfflineEngine:
    """Prefill and decode workers of a `PdFleet` behind one `submit`."""

    def __init__(
        self, fleet: PdFleet, *, on_finish: Callable[[Timeline], None] | None = None
    ) -> None:
        self.fleet = fleet
        self.on_finish = on_finish
        self.prefills = [
            _Worker(build_core(fleet.prefill, fleet.engine)[0])
            for _ in range(fleet.prefill_workers)
        ]
        self.decodes = [
            _Worker(build_core(fleet.decode, fleet.engine)[0]) for _ in range(fleet.decode_workers)
        ]
        self.link = kv_link(fleet.prefill, fleet.decode, fleet.link)
        self.timelines: dict[str, Timeline] = {}  # what a client sees, from its arrival
        self.phases: dict[str, PdPhase] = {}
        self.now_s = 0.0
        self._requests: dict[str, Request] = {}
        self._submitted = 0
        self._next_prefill = self._next_decode = 0

    @property
    def workers(self) -> list[_Worker]:
        return [*self.prefills, *self.decodes]

    def submit(self, request: Request, arrival_s: float) -> None:
        """`request` reaches the fleet at `arrival_s`: its prefill worker gets it then."""
        rid = request.request_id
        self.timelines[rid] = Timeline(
            request_id=rid, arrival_s=arrival_s, prompt_tokens=len(request.prompt_ids)
        )
        self.phases[rid] = PdPhase()
        self._requests[rid] = request
        worker = self.prefills[self._next_prefill % len(self.prefills)]
        self._next_prefill += 1
        self._push(worker, replace(request, max_tokens=1, min_tokens=0), arrival_s)

    def _push(self, worker: _Worker, request: Request, at_s: float) -> None:
        heapq.heappush(worker.arrivals, (at_s, self._submitted, request))
        self._submitted += 1

    def run(self) -> None:
        """Step until every request (and any `on_finish` submits) has finished."""
        workers = self.workers
        while True:
            worker = min(workers, key=_Worker.next_s)
            start = worker.next_s()
            if math.isinf(start):
                return
            self._admit(worker, start)
            core = worker.core
            if not core.has_work():
                continue
            step = core.schedule(start)
            if step is None:
                raise RuntimeError(f"worker has work but scheduled nothing at {start} s")
            emissions = core.complete(step)
            worker.now_s = step.end_s
            self.now_s = max(self.now_s, step.end_s)
            decoding = worker in self.decodes
            for e in emissions:
                if decoding:
                    self._decoded(e.sequence, e.token_ids, step.end_s, e.finished)
                elif e.finished:
                    self._prefilled(e.sequence, step.end_s)

    def _admit(self, worker: _Worker, until_s: float) -> None:
        arrivals = worker.arrivals
        while arrivals and arrivals[0][0] <= until_s:
            at_s, _, request = heapq.heappop(arrivals)
            try:
                worker.core.add(request, at_s)
            except MemorywallError as e:
                timeline = self.timelines[request.request_id]
                timeline.error = e
                self._finish(timeline)

    def _prefilled(self, seq: Sequence, end_s: float) -> None:
        rid = seq.request.request_id
        timeline, phase = self.timelines[rid], self.phases[rid]
        timeline.first_scheduled_s = seq.first_scheduled_s
        timeline.cached_tokens = seq.cached_tokens
        timeline.energy_j = seq.energy_j
        prefill_s = end_s - (seq.first_scheduled_s or end_s)
        t = kv_transfer(
            self.fleet.prefill,
            self.link,
            seq.prompt_len,
            prefill_s=prefill_s,
            layer_overlap=self.fleet.layer_overlap,
        )
        phase.prefill_end_s, phase.transfer = end_s, t
        worker = self.decodes[self._next_decode % len(self.decodes)]
        self._next_decode += 1
        self._push(worker, replace(self._requests[rid], kv_transferred=True), end_s + t.exposed_s)

    def _decoded(self, seq: Sequence, ids: list[int], end_s: float, finished: bool) -> None:
        timeline = self.timelines[seq.request.request_id]
        timeline.group_times_s.append(end_s)
        timeline.group_tokens.append(len(ids))
        if finished:
            timeline.completion_tokens = len(seq.output_ids)
            timeline.preemptions = seq.preemptions
            timeline.energy_j += seq.energy_j
            timeline.reason = seq.finish_reason
            self._finish(timeline)

    def _finish(self, timeline: Timeline) -> None:
        del self._requests[timeline.request_id]
        if self.on_finish is not None:
            self.on_finish(timeline)

    def counters(self) -> tuple[int, int, int, float]:
        """Steps, tokens generated (by the decode workers), preemptions and energy, all
        workers together."""
        cs = [w.core.counters for w in self.workers]
        tokens = sum(w.core.counters.tokens_generated for w in self.decodes)
        return (
            sum(c.steps for c in cs),
            tokens,
            sum(c.preemptions for c in cs),
            sum(c.energy_j for c in cs),
        )
