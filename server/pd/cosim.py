"""A split fleet as one offline engine: prefill and decode workers on one virtual clock.

`PdOfflineEngine` is an `offline.OfflineEngineLike` (`submit`, `on_finish`, `run`,
`now_s`, `totals`), so a load generator's release rules drive it unchanged, closed loop
included. Inside, each worker is an `EngineCore` with its own clock and arrival
queue, run by the engine's loop rule (`loop`), and the engine always runs the step
that starts earliest across workers:
a step that ends at t can only cause arrivals at t or later (a decode worker
gets the request when its KV lands, a closed-loop user sends its next request
when its last one ends), so no worker ever plans a step before an arrival that
could still come in before it. Each request prefills on a prefill worker (a
one-token request, as the live prefill half), its KV crosses the link
(`core.kv_transfer`), and it decodes on a decode worker from the moment the KV
lands (`Request.kv_transferred`); workers are taken round robin.

Transfers share the link: each is booked, in the order the prefills end, on its
prefill worker's egress port and its decode worker's ingress port
(`kv_transfer.book`), as the live halves book them. Until it lands, the prefill
worker keeps the prompt's KV blocks (`Request.keep_kv`), so a loaded prefill worker runs
short of KV as a real one does. A prefill's end, and a transfer's landing, are
events on the one clock, taken before any step that starts at or after them.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from memorywall.core.kv_transfer import KvTransfer, LinkPort, kv_link, transfer_window
from memorywall.errors import MemorywallError
from memorywall.server.engine.build import build_core
from memorywall.server.engine.decode_run import DecodeRun
from memorywall.server.engine.loop import Move, next_move, step_offline
from memorywall.server.engine.offline import RunTotals, Timeline
from memorywall.server.engine.scheduler import EngineCore, Request, SeqState

if TYPE_CHECKING:
    from memorywall.server.pd.offline import PdFleet

__all__ = ["PdOfflineEngine", "PdPhase"]


@dataclass(slots=True)
class PdPhase:
    """What the prefill side did for one request."""

    prefill_end_s: float | None = None
    transfer: KvTransfer | None = None


class _Worker:
    """One worker's engine core, its clock, its arrivals and its end of the link."""

    def __init__(self, core: EngineCore, *, decoding: bool) -> None:
        self.core = core
        self.decoding = decoding  # a decode worker (else a prefill worker)
        self.now_s = 0.0  # end of its last step
        self.arrivals: list[tuple[float, int, Request]] = []
        self.port = LinkPort()

    def move(self) -> Move:
        """What it does next, by the engine's loop rule (`loop.next_move`)."""
        arrivals = self.arrivals
        return next_move(self.core, self.now_s, arrivals[0][0] if arrivals else math.inf)

    def next_s(self) -> float:
        """When its next event (a step, or admitting an arrival) starts; inf if none."""
        return self.move().at_s


class PdOfflineEngine:
    """Prefill and decode workers of a `PdFleet` behind one `submit`."""

    def __init__(
        self,
        fleet: PdFleet,
        *,
        on_finish: Callable[[Timeline], None] | None = None,
        fast: bool = True,
    ) -> None:
        self.fleet = fleet
        self.on_finish = on_finish
        self.fast = fast  # take a decode worker's undecided steps many at a time
        self.prefills = [
            _Worker(build_core(fleet.prefill, fleet.engine)[0], decoding=False)
            for _ in range(fleet.prefill_workers)
        ]
        self.decodes = [
            _Worker(build_core(fleet.decode, fleet.engine)[0], decoding=True)
            for _ in range(fleet.decode_workers)
        ]
        self.link = kv_link(fleet.prefill, fleet.decode, fleet.link)
        self.timelines: dict[str, Timeline] = {}  # what a client sees, from its arrival
        self.phases: dict[str, PdPhase] = {}
        self.now_s = 0.0
        self._requests: dict[str, Request] = {}
        self._submitted = 0
        # Prefill ends and KV landings, by time: (time, order, action at that time).
        self._events: list[tuple[float, int, Callable[[float], object]]] = []
        self._order = itertools.count()
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
        prefill = replace(request, max_tokens=1, min_tokens=0, keep_kv=True)
        self._push(worker, prefill, arrival_s)

    def _push(self, worker: _Worker, request: Request, at_s: float) -> None:
        heapq.heappush(worker.arrivals, (at_s, self._submitted, request))
        self._submitted += 1

    def run(self) -> None:
        """Step until every request (and any `on_finish` submits) has finished."""
        workers = self.workers
        events = self._events
        while True:
            moves = [w.move() for w in workers]
            i = min(range(len(moves)), key=lambda i: moves[i].at_s)  # the first, on a tie
            worker, move = workers[i], moves[i]
            start = move.at_s
            if events and events[0][0] <= start:
                at_s, _, action = heapq.heappop(events)
                action(at_s)
                continue
            if math.isinf(start):
                return
            if move.admit:
                self._admit(worker, start)
            if not move.step:
                continue  # idle until these arrivals: the rule again, with them in the queue
            core = worker.core
            decoding = worker.decoding
            horizon_s = self._horizon_s(worker) if decoding and self.fast else math.inf
            done = step_offline(core, start, horizon_s, fast=decoding and self.fast)
            if done is None:
                if not events:
                    raise RuntimeError(f"worker has work but scheduled nothing at {start} s")
                # Out of KV, held for transfers still under way: wait for the next landing.
                worker.now_s = events[0][0]
                continue
            if type(done) is DecodeRun:
                self._decoded_run(done)
                worker.now_s = done.end_times_s[-1]
                self.now_s = max(self.now_s, worker.now_s)
                continue
            end_s = done.end_s
            worker.now_s = end_s
            self.now_s = max(self.now_s, end_s)
            for e in done.emissions:
                if decoding:
                    self._decoded(e.sequence, e.token_ids, end_s, e.finished)
                elif e.finished:
                    self._prefilled(worker, e.sequence, end_s)

    def _horizon_s(self, worker: _Worker) -> float:
        """The earliest a request could reach `worker` other than from its queue: a pending
        prefill end or landing, or any other worker's next step (whose effects come at its
        end or later)."""
        soonest = worker.arrivals[0][0] if worker.arrivals else math.inf
        if self._events:
            soonest = min(soonest, self._events[0][0])
        others = (w.next_s() for w in self.workers if w is not worker)
        return min([soonest, *others])

    def _decoded_run(self, run: DecodeRun) -> None:
        """Many plain decode steps at once (`decode_run`): one token per sequence per step,
        none of them a request's last."""
        ends = run.end_times_s
        ones = [1] * len(ends)
        for seq in run.sequences:
            timeline = self.timelines[seq.request.request_id]
            timeline.group_times_s += ends
            timeline.group_tokens += ones

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

    def _at(self, at_s: float, action: Callable[[float], object]) -> None:
        """Run `action(at_s)` at `at_s` on the virtual clock (what it returns is dropped)."""
        heapq.heappush(self._events, (at_s, next(self._order), action))

    def _prefilled(self, worker: _Worker, seq: SeqState, end_s: float) -> None:
        """Called as the prefill's step completes, before its worker plans another."""
        rid = seq.request.request_id
        timeline, phase = self.timelines[rid], self.phases[rid]
        timeline.first_scheduled_s = seq.first_scheduled_s
        timeline.cached_tokens = seq.cached_tokens
        timeline.energy_j = seq.energy_j
        phase.prefill_end_s = end_s
        prefill_s = end_s - (seq.first_scheduled_s or end_s)
        tokens = seq.prompt_len
        self._at(end_s, lambda at_s: self._send(worker, rid, tokens, prefill_s, at_s))

    def _send(
        self, worker: _Worker, rid: str, tokens: int, prefill_s: float, ready_s: float
    ) -> None:
        """Book the KV transfer of a prefill that ended at `ready_s`."""
        decode = self.decodes[self._next_decode % len(self.decodes)]
        self._next_decode += 1
        window = transfer_window(
            self.fleet.prefill,
            self.link,
            tokens,
            ready_s=ready_s,
            prefill_s=prefill_s,
            layer_overlap=self.fleet.layer_overlap,
        )
        booking = window.book(worker.port, decode.port, self.link)
        worker.port.add(booking)
        decode.port.add(booking)
        t = self.phases[rid].transfer = window.timed(booking, self.link)
        landed_s = ready_s + t.exposed_s
        self._push(decode, replace(self._requests[rid], kv_transferred=True), landed_s)
        self._at(landed_s, lambda _: worker.core.kv.release_kept(rid))

    def _decoded(self, seq: SeqState, ids: list[int], end_s: float, finished: bool) -> None:
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

    def totals(self) -> RunTotals:
        """Steps, preemptions and energy of all workers together; tokens generated by the
        decode workers (a prefill worker's one token is not the client's)."""
        cs = [w.core.counters for w in self.workers]
        return RunTotals(
            steps=sum(c.steps for c in cs),
            tokens_generated=sum(w.core.counters.tokens_generated for w in self.decodes),
            preemptions=sum(c.preemptions for c in cs),
            energy_j=sum(c.energy_j for c in cs),
        )
