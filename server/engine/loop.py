"""The engine's step loop rule, written once for every driver.

Every driver runs `EngineCore` by the same rule: while the core has no work the
engine idles until the next arrival; otherwise the next step starts at the last
step's end, or at the oldest waiting request's arrival if that is later (the
engine idled until it), every request that has arrived by then is handed to the
core before the step is planned, and the step completes at its end, where the
next one starts. `next_move` is that rule as a function of the core's state, the
last step's end and the earliest arrival the driver still holds; `step_offline`
is what a driver on a virtual clock does with a step: a stretch of plain
decoding at once (`decode_run`) where it applies, else one step planned and
completed.

The drivers keep only what is theirs: the live one (`live.AsyncEngine`) sleeps
to each step's end on a clock (through a stretch of plain decoding at a fixed
cost a step, `live_decode`), moves the timeline when the host stalls, and
feeds streams; the offline one (`offline.OfflineEngine`) jumps a virtual clock;
the disaggregated co-simulation (`pd.cosim`) runs several workers and their KV
transfers on one clock.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from memorywall.server.engine.decode_run import DecodeRun, advance_decode
from memorywall.server.engine.scheduler import Emission, EngineCore

__all__ = ["Move", "Stepped", "next_move", "step_offline"]

# Results are named tuples built with tuple's own constructor: a named tuple's `__new__` (or a
# dataclass's `__init__`) is one more Python call, and a stepped simulation makes two of these
# a step; the offline engine unpacks them.
_new = tuple.__new__


class Move(NamedTuple):
    """What a driver does next.

    `step`: a step starts at `at_s`; else the engine idles until `at_s`, the next
    arrival (`math.inf`: none is known, so nothing happens until a request is
    submitted). `admit`: arrivals the driver holds are due by `at_s`, to be handed
    to the core before anything else happens then.
    """

    at_s: float
    step: bool
    admit: bool


_IDLE = Move(math.inf, False, False)  # idle with nothing known to arrive


def next_move(core: EngineCore, last_end_s: float, queued_s: float = math.inf) -> Move:
    """The rule: what happens after a step that ended at `last_end_s` (0 before the first).

    `queued_s`: the earliest arrival the driver holds and has not handed to the core
    (`math.inf`: none; a live driver hands each request over as it is submitted).
    """
    if core.waiting or core.running:  # `core.has_work()`, inlined: once per step
        at_s = core.next_arrival_s()
        if at_s < last_end_s:
            at_s = last_end_s
        return _new(Move, (at_s, True, queued_s <= at_s))
    if queued_s == math.inf:
        return _IDLE
    return _new(Move, (queued_s if queued_s > last_end_s else last_end_s, False, True))


class Stepped(NamedTuple):
    """One step planned and completed: when it ended and what it emitted."""

    end_s: float
    emissions: list[Emission]


def step_offline(
    core: EngineCore, start_s: float, horizon_s: float, *, fast: bool
) -> DecodeRun | Stepped | None:
    """Run the step that starts at `start_s` on a virtual clock.

    With `fast`, the plain decode steps from `start_s` that need no decision are
    applied at once (`advance_decode`; `horizon_s`: the earliest a request could
    still join). Otherwise one step is planned and completed; None when the core
    has work but can plan nothing now (it waits for KV that only a release frees).
    """
    if fast and (run := advance_decode(core, start_s, horizon_s)):
        return run
    step = core.schedule(start_s)
    if step is None:
        return None
    return _new(Stepped, (step.end_s, core.complete(step)))
