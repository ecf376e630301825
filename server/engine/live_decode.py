"""Plain decode steps live at a fixed Python cost a step: the live driver's stretch.

While the batch is in a stretch `decode_run.plan_decode` accepts (every sequence
decoding, no stop tokens to watch, no speculation or LoRA, nobody waiting who could
join, nobody's last token), each step's outcome is known at its start. The live
driver (`live.AsyncEngine`) costs the stretch once, sleeps from step end to step
end and counts the steps it slept through (`taken`); the sequences' state (tokens,
KV growth, energy, the core's counters) is applied in bulk when the stretch closes
(`apply`), as `decode_run.apply_decode` applies k steps offline. A stream that sends
a message mid-stretch gets its sequence's tokens then (`tokens`): ids drawn in the
sequence's own order, each token timed at its step's end.

A stretch closes at the steps already slept through: when it runs out, when a request
arrives that could join (it joins at the next step boundary, as step by step), or,
through `AsyncEngine`, before anything changes the batch or the KV pool (an abort, a
release, a host stall, a new KV-event subscriber); then the step in progress is
planned by `EngineCore.schedule` as usual. KV events of a stretch's steps are
published at its close: the same events, in the same order, as step by step.
"""

from __future__ import annotations

from memorywall.server.engine.api import StepReport
from memorywall.server.engine.decode_run import DecodePlan, apply_decode
from memorywall.server.engine.scheduler import EngineCore

__all__ = ["Stretch"]


class Stretch:
    """A planned run of plain decode steps, applied lazily. `taken`: the steps slept
    through; `drawn[i]`: the steps whose token sequence i already holds (<= `taken`)."""

    __slots__ = ("drawn", "first_gaps", "n", "plan", "taken")

    def __init__(self, plan: DecodePlan, first_gaps: list[tuple[float, int]]) -> None:
        self.plan = plan
        self.n = len(plan.sequences)
        self.drawn = [0] * self.n
        self.taken = 0
        # Step 0's `StepReport.token_gaps`: each sequence's gap since its last token (host
        # stalls out); from step 1 on every sequence's gap is the last step's time.
        self.first_gaps = first_gaps

    def tokens(self, i: int) -> tuple[list[int], list[float]]:
        """Sequence i's tokens of the steps taken so far that it does not hold yet, drawn
        now and appended to its output, with their times."""
        d, t = self.drawn[i], self.taken
        if t == d:
            return [], []
        seq = self.plan.sequences[i]
        ids = seq.tokens.next_ids(t - d)  # a list: streams keep ids as lists
        seq.output_ids.extend(ids)
        self.drawn[i] = t
        return ids, self.plan.ends[d + 1 : t + 1]

    def apply(self, core: EngineCore) -> None:
        """Close the stretch at the steps taken: every sequence must hold their tokens."""
        if self.taken:
            apply_decode(core, self.plan, self.taken, drawn=True)

    def report(self, j: int, preemptions_total: int) -> StepReport:
        """Step j's report to observers, as `reports.step_report` makes it step by step."""
        plan = self.plan
        ends = plan.ends
        n = self.n
        return StepReport(
            time_s=plan.times_s[j],
            energy_j=plan.energies_j[j],
            tokens=n,
            generated=n,
            preemptions_total=preemptions_total,
            first_tokens=[],
            token_gaps=self.first_gaps if j == 0 else [(ends[j + 1] - ends[j], n)],
            start_s=ends[j],
        )

    def applied_so_far(self) -> tuple[int, int, float, int]:
        """What closing now would add to the core's counters and KV use: steps, tokens,
        energy and blocks (those of the step in progress included: it has started)."""
        plan, t = self.plan, self.taken
        blocks = int((plan.growth.steps <= t).sum()) if t < plan.steps else plan.growth.blocks
        return t, t * self.n, sum(plan.energies_j[:t]), blocks
