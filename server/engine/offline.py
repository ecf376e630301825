"""The offline engine: drives `EngineCore` on a virtual clock, as fast as the CPU allows.

The loop is the live driver's rule (`loop.next_move`) without the sleeping:
each step starts where the last one ended, or at the next arrival when the
engine is idle, and every request that has arrived by a step's start is in the
queue when that step is planned. Requests may be submitted ahead of time (an
open-loop schedule) or from `on_finish` as others finish (a closed loop), so a
load generator's release rules sit outside and the engine stays the same one
that serves live. With `fast` (the default) stretches of plain decoding are
applied many steps at a time (`decode_run.py`), with the same result.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from memorywall.errors import MemorywallError
from memorywall.server.engine.decode_run import DecodeRun
from memorywall.server.engine.loop import next_move, step_offline
from memorywall.server.engine.scheduler import EngineCore, FinishReason, Request, SeqState


@dataclass(slots=True)
class Timeline:
    """One request's modelled history: when it arrived and when each group of tokens came out.

    A group is what one step emitted for the request (more than one token with
    speculative decoding). Times are seconds on the virtual clock.
    """

    request_id: str
    arrival_s: float
    prompt_tokens: int
    group_times_s: list[float] = field(default_factory=list)
    group_tokens: list[int] = field(default_factory=list)
    completion_tokens: int = 0
    cached_tokens: int = 0
    preemptions: int = 0
    energy_j: float = 0.0
    first_scheduled_s: float | None = None
    reason: FinishReason | None = None
    error: MemorywallError | None = None  # refused on arrival (as a server answers an error)

    @property
    def first_token_s(self) -> float | None:
        return self.group_times_s[0] if self.group_times_s else None

    @property
    def last_token_s(self) -> float | None:
        return self.group_times_s[-1] if self.group_times_s else None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunTotals:
    """What an offline engine did so far, all its workers together."""

    steps: int
    tokens_generated: int  # by the workers that decode
    preemptions: int
    energy_j: float


class OfflineEngineLike(Protocol):
    """An engine on a virtual clock, as simulation code drives it (`memorywall` simulate):
    requests go in with `submit` (ahead of time, or from `on_finish` as others finish),
    `run` steps until all have finished, `now_s` is then the end of the last step.
    `OfflineEngine` and the disaggregated `pd.cosim.PdOfflineEngine` implement it."""

    on_finish: Callable[[Timeline], None] | None
    now_s: float

    def submit(self, request: Request, arrival_s: float) -> None: ...

    def run(self) -> None: ...

    def totals(self) -> RunTotals: ...


class OfflineEngine:
    """`EngineCore` on a virtual clock that jumps from step to step (an `OfflineEngineLike`)."""

    def __init__(
        self,
        core: EngineCore,
        *,
        on_finish: Callable[[Timeline], None] | None = None,
        fast: bool = True,
    ) -> None:
        self.core = core
        self.on_finish = on_finish
        self.fast = fast  # take undecided decode steps many at a time (`decode_run`)
        self.now_s = 0.0  # end of the last step
        self.timelines: dict[str, Timeline] = {}  # accepted requests, by id
        self.refused: list[Timeline] = []
        self._arrivals: list[tuple[float, int, Request]] = []
        self._submitted = 0

    def submit(self, request: Request, arrival_s: float) -> None:
        """Queue `request` to arrive at `arrival_s` on the virtual clock.

        An arrival before `now_s` came in while the last step ran, as a live request
        does; it joins the next step. The engine validates a request on arrival; one
        it refuses finishes at once with `Timeline.error` set.
        """
        heapq.heappush(self._arrivals, (arrival_s, self._submitted, request))
        self._submitted += 1

    def run(self) -> None:
        """Step until every submitted request (and any `on_finish` submits) has finished."""
        core = self.core
        arrivals = self._arrivals
        timelines = self.timelines
        fast = self.fast
        inf = math.inf
        while True:
            at_s, step, admit = next_move(core, self.now_s, arrivals[0][0] if arrivals else inf)
            if admit:
                self._arrive(at_s)
            if not step:
                if at_s == inf:
                    return  # idle, and nothing more will arrive
                continue  # idle until these arrivals: the jump, then the rule again
            done = step_offline(core, at_s, arrivals[0][0] if arrivals else inf, fast=fast)
            if done is None:
                raise RuntimeError(f"engine has work but scheduled nothing at {at_s} s")
            if type(done) is DecodeRun:
                ends = done.end_times_s
                ones = [1] * len(ends)
                for seq in done.sequences:
                    timeline = timelines[seq.request.request_id]
                    timeline.group_times_s += ends
                    timeline.group_tokens += ones
                self.now_s = ends[-1]
                continue
            end_s, emissions = done
            self.now_s = end_s
            for e in emissions:
                seq = e.sequence
                timeline = timelines[seq.request.request_id]
                timeline.group_times_s.append(end_s)
                timeline.group_tokens.append(len(e.token_ids))
                if e.finished:
                    self._finish(timeline, seq)

    def totals(self) -> RunTotals:
        c = self.core.counters
        return RunTotals(
            steps=c.steps,
            tokens_generated=c.tokens_generated,
            preemptions=c.preemptions,
            energy_j=c.energy_j,
        )

    def _arrive(self, until_s: float) -> None:
        """Hand the engine every request that has arrived by `until_s`, in arrival order."""
        arrivals = self._arrivals
        while arrivals and arrivals[0][0] <= until_s:
            arrival_s, _, request = heapq.heappop(arrivals)
            timeline = Timeline(
                request_id=request.request_id,
                arrival_s=arrival_s,
                prompt_tokens=len(request.prompt_ids),
            )
            try:
                self.core.add(request, arrival_s)
            except MemorywallError as e:
                timeline.error = e
                self.refused.append(timeline)
                if self.on_finish is not None:
                    self.on_finish(timeline)
                continue
            self.timelines[request.request_id] = timeline

    def _finish(self, timeline: Timeline, seq: SeqState) -> None:
        timeline.completion_tokens = len(seq.output_ids)
        timeline.cached_tokens = seq.cached_tokens
        timeline.preemptions = seq.preemptions
        timeline.energy_j = seq.energy_j
        timeline.first_scheduled_s = seq.first_scheduled_s
        timeline.reason = seq.finish_reason
        if self.on_finish is not None:
            self.on_finish(timeline)
