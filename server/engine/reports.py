"""What the engine reports of its work: a step to observers, a request's end to its stream."""

from __future__ import annotations

from collections.abc import Sequence

from memorywall.server.engine.api import BatchEntry, Finished, StepReport
from memorywall.server.engine.scheduler import Emission, SeqState, Step


def finished(seq: SeqState, *, host_stall_s: float, decode_host_stall_s: float) -> Finished:
    """A request's end from its sequence's modelled timeline and the host stalls it saw."""
    arrival = seq.arrival_s
    first_sched = seq.first_scheduled_s if seq.first_scheduled_s is not None else arrival
    first = seq.first_token_s if seq.first_token_s is not None else first_sched
    last = seq.last_token_s if seq.last_token_s is not None else first
    assert seq.finish_reason is not None, "only a finished sequence has an end"
    return Finished(
        request_id=seq.request.request_id,
        reason=seq.finish_reason,
        prompt_tokens=len(seq.request.prompt_ids),
        completion_tokens=len(seq.output_ids),
        cached_tokens=seq.cached_tokens,
        queue_s=first_sched - arrival,
        prefill_s=first - first_sched,
        decode_s=last - first,
        ttft_s=first - arrival,
        e2e_s=last - arrival,
        preemptions=seq.preemptions,
        energy_j=seq.energy_j,
        last_token_id=seq.output_ids[-1] if seq.output_ids else None,
        host_stall_s=host_stall_s,
        decode_host_stall_s=decode_host_stall_s,
        received_s=arrival,
        protocol=seq.request.protocol,
        lora=seq.request.lora.name if seq.request.lora is not None else None,
    )


def step_report(
    step: Step,
    emissions: list[Emission],
    preemptions_total: int,
    host_stalls_s: Sequence[float] | None = None,
    *,
    stalled_s: float = 0.0,
    batch: list[BatchEntry] | None = None,
) -> StepReport:
    """What observers count of a completed step and the tokens it gave, in the model's own
    time: `host_stalls_s[i]` (host stall inside emission i's gap or TTFT) is taken out.
    `stalled_s`, `batch`: see `StepReport` (`batch_entries` builds the batch)."""
    first_tokens: list[tuple[int, float]] = []
    gaps: list[tuple[float, int]] = []
    generated = 0
    for i, e in enumerate(emissions):
        k = len(e.token_ids)
        generated += k
        seq = e.sequence
        stall = host_stalls_s[i] if host_stalls_s is not None else 0.0
        if e.previous_token_s is None:
            first_tokens.append((seq.prompt_len, e.time_s - seq.arrival_s - stall))
            continue
        gap = (e.time_s - e.previous_token_s - stall) / k
        # Sequences decoded together share a gap: one run each.
        if gaps and gaps[-1][0] == gap:
            gaps[-1] = (gap, gaps[-1][1] + k)
        else:
            gaps.append((gap, k))
    cost = step.cost
    return StepReport(
        time_s=cost.time_s,
        energy_j=cost.energy_j,
        tokens=int(cost.tokens),  # a count the core carries as a float, like all its terms
        generated=generated,
        preemptions_total=preemptions_total,
        first_tokens=first_tokens,
        token_gaps=gaps,
        start_s=step.start_s,
        stalled_s=stalled_s,
        batch=batch,
    )


def batch_entries(step: Step) -> list[BatchEntry]:
    """The step's requests and where each one's tokens start: read before `complete` moves
    their positions on."""
    return [
        BatchEntry(seq.request.request_id, seq.computed, n, decoding)
        for seq, n, decoding in step.scheduled
    ]
