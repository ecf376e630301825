"""The engine core: waiting queue, continuous batching, chunked prefill, KV admission, preemption.

With prefix caching (on by default, as in vLLM) a sequence's full blocks are
entered into the block pool's cache when the step that computes them is
scheduled, and an admitted sequence starts from the longest cached run of its
prefix (never its last token: that one is computed so a token can be sampled).
Its first prefill chunk then carries the hit as `PrefillChunk.cached_tokens`,
so the step costs only the uncached tokens.

No clock and no I/O: `schedule(now)` plans the step that starts at `now`
and asks the performance core what it costs; `complete(step)` applies its
results at its end. A live driver sleeps between the two; a test or an
offline simulation just calls them in turn.

Every KV rule (blocks, prefix cache, kept KV) is `KVManager`'s: the scheduler asks
it for room and picks whom to preempt when there is none, and never sees a block.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from memorywall.core import Batch, PrefillChunk, StepCost
from memorywall.core.lora import LoraAdapter
from memorywall.errors import (
    ContextLengthError,
    DuplicateRequestError,
    InvalidRequestError,
    RequestTooLargeError,
)
from memorywall.server.engine import kernel
from memorywall.server.engine.kv import (
    ROOT_HASH,
    PrefixCacheStats,
    blocks_for,
    hash_root,
    make_block_pool,
)
from memorywall.server.engine.kv_manager import KVManager
from memorywall.server.engine.tokens import TokenSource, ids_array, token_source_class

if TYPE_CHECKING:
    from memorywall.server.engine.lora import LoraSlots

_UINT64 = (1 << 64) - 1


class StepCostModel(Protocol):
    """The seam to the performance core (`memorywall.core.StepModel` implements it)."""

    def step_cost(self, batch: Batch) -> StepCost: ...


class FinishReason(Enum):
    LENGTH = "length"
    STOP = "stop"
    ABORT = "abort"


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    seed: int = 0
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name}: must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True)
class ModelLimits:
    """What the engine needs to know of the deployment besides step costs."""

    kv_capacity_tokens: int
    max_context: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    draft_tokens: int = 0
    acceptance_rate: float = 0.0


@dataclass(frozen=True, kw_only=True, init=False)
class Request:
    """One request as the engine receives it (immutable). Its `__init__` is written out:
    a frozen dataclass's generated one sets each field with `object.__setattr__`, ~2 us of
    the offline path's per-request cost; filling `__dict__` in one call costs ~0.8 us.
    tests/server/test_scheduler.py checks its defaults are the fields' own."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: frozenset[int] = frozenset()
    sampling_seed: int | None = None
    # Disaggregated decode: the prompt's KV arrived from a prefill worker, so at first
    # admission all but the last prompt token count as computed (a preempted one recomputes).
    kv_transferred: bool = False
    # Disaggregated prefill: once it finishes (not aborted) its KV blocks are kept, counted
    # as used, until `KVManager.release_kept`: the transfer to the decode worker reads them.
    keep_kv: bool = False
    # The wire protocol a front received it on ("openai", "sglang", ...): for metrics only,
    # never read by scheduling or token generation; "" when no front named one.
    protocol: str = ""
    # The LoRA adapter it runs with (`lora.py`: the front resolved its model name); None:
    # the base model.
    lora: LoraAdapter | None = None

    def __init__(
        self,
        *,
        request_id: str,
        prompt_ids: tuple[int, ...],
        max_tokens: int,
        min_tokens: int = 0,
        ignore_eos: bool = False,
        stop_token_ids: frozenset[int] = frozenset(),
        sampling_seed: int | None = None,
        kv_transferred: bool = False,
        keep_kv: bool = False,
        protocol: str = "",
        lora: LoraAdapter | None = None,
    ) -> None:
        self.__dict__.update(
            request_id=request_id,
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            ignore_eos=ignore_eos,
            stop_token_ids=stop_token_ids,
            sampling_seed=sampling_seed,
            kv_transferred=kv_transferred,
            keep_kv=keep_kv,
            protocol=protocol,
            lora=lora,
        )


@dataclass(eq=False, slots=True)
class SeqState:
    """A request in the engine: its tokens, progress and timings. The KV fields
    (`blocks` to `cached_blocks`) are `KVManager`'s, written by it alone."""

    request: Request
    arrival_s: float
    tokens: TokenSource
    stop_at: int
    # Machine integers (`tokens.ids_array`): stored, counted and hashed, never boxed.
    output_ids: array[int] = field(default_factory=ids_array)
    computed: int = 0  # tokens whose KV exists
    blocks: int = 0  # len(block_ids)
    block_ids: array[int] = field(default_factory=ids_array)  # one reference taken on each
    block_hashes: array[int] = field(default_factory=ids_array)  # of its full blocks, so far
    cached_blocks: int = 0  # leading block_ids already offered to the prefix cache
    cached_tokens: int = 0  # prefix found cached at first admission
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    energy_j: float = 0.0
    preemptions: int = 0
    finish_reason: FinishReason | None = None
    prompt_len: int = field(init=False)
    max_kv_tokens: int = field(init=False)
    watches_stops: bool = field(init=False)  # a stop token may end it before `stop_at`
    hash_root: int = field(init=False)  # its first block's parent hash (`kv.hash_root`)

    def __post_init__(self) -> None:
        r = self.request  # one attribute lookup, not five: this runs once a request
        lora = r.lora
        self.hash_root = ROOT_HASH if lora is None else hash_root(lora.name)
        self.prompt_len = n = len(r.prompt_ids)
        self.max_kv_tokens = n + r.max_tokens
        self.watches_stops = bool(r.stop_token_ids) and not r.ignore_eos

    @property
    def total_tokens(self) -> int:
        return self.prompt_len + len(self.output_ids)

    def token_ids(self, start: int, end: int) -> tuple[int, ...]:
        """Prompt and generated tokens `start:end`."""
        prompt = self.request.prompt_ids
        p = self.prompt_len
        if end <= p:
            return prompt[start:end]
        if start >= p:
            return tuple(self.output_ids[start - p : end - p])
        return prompt[start:] + tuple(self.output_ids[: end - p])


@dataclass(slots=True)
class Emission:
    sequence: SeqState
    token_ids: list[int]
    time_s: float
    finished: bool
    previous_token_s: float | None  # the sequence's previous token, None for its first


@dataclass(slots=True)
class Step:
    start_s: float
    end_s: float
    cost: StepCost
    scheduled: list[tuple[SeqState, int, bool]]  # (sequence, new tokens, decoding)
    tokens: int  # new tokens over the batch


@dataclass
class EngineCounters:
    steps: int = 0
    preemptions: int = 0
    finished: int = 0
    aborted: int = 0
    tokens_generated: int = 0
    energy_j: float = 0.0


def token_seed(seed: int, request: Request, hash_tuple: Callable[[tuple], int] = hash) -> int:
    """The seed of a request's synthetic tokens: a function of the engine's seed, the
    request's sampling seed and its prompt. Python's hash of a tuple of ints is the same in
    every process of one (64-bit CPython) version: no PYTHONHASHSEED salt applies to ints,
    as for the KV block hashes. For a 512-token prompt it costs ~4 us, where a blake2b
    digest of the prompt's repr cost ~50 us, a tenth of a simulated request; `hash_tuple`
    may be the compiled kernel's `hash_tuple` (the same value, ~10x faster)."""
    sampling = request.sampling_seed
    return hash_tuple((seed, sampling is None, sampling or 0, request.prompt_ids)) & _UINT64


def check_request(r: Request, max_context: int, kv_capacity_tokens: int, block: int) -> None:
    """Raise what `EngineCore.add` raises for a request no engine of these limits could run
    (the fronts of a multi-process server check it before they start a response)."""
    if r.max_tokens < 1:
        raise InvalidRequestError(f"max_tokens: must be >= 1, got {r.max_tokens}")
    if r.min_tokens > r.max_tokens:
        raise InvalidRequestError(f"min_tokens: {r.min_tokens} exceeds max_tokens {r.max_tokens}")
    if not r.prompt_ids:
        raise InvalidRequestError("prompt: empty")
    total = len(r.prompt_ids) + r.max_tokens
    if total > max_context:
        raise ContextLengthError(
            f"prompt ({len(r.prompt_ids)} tokens) + max_tokens ({r.max_tokens}) = {total} "
            f"exceeds the context window of {max_context}"
        )
    blocks = kv_capacity_tokens // block
    if blocks_for(total, block) > blocks:
        raise RequestTooLargeError(
            f"prompt + max_tokens = {total} tokens exceeds the KV capacity of "
            f"{blocks * block} tokens"
        )


class EngineCore:
    def __init__(
        self,
        step_model: StepCostModel,
        limits: ModelLimits,
        config: EngineConfig,
        lora: LoraSlots | None = None,
    ) -> None:
        self.step_model = step_model
        self.lora = lora  # with --enable-lora: the adapters' batch rule and step cost
        self.limits = limits
        self.config = config
        pool = make_block_pool(limits.kv_capacity_tokens // config.block_size, config.block_size)
        self.kv = KVManager(pool, enable_prefix_caching=config.enable_prefix_caching)
        self._token_source = token_source_class()  # compiled draws, or the reference
        compiled = kernel.compiled if kernel.enabled() else None
        self._hash_tuple = hash if compiled is None else compiled.hash_tuple
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []
        self.live: dict[str, SeqState] = {}
        self.counters = EngineCounters()

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """A copy of the prefix cache counters (`hit_rate` is cumulative)."""
        return replace(self.kv.stats)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def next_arrival_s(self) -> float:
        """When the oldest work arrived: the earliest a step can start (0 if nothing waits)."""
        if self.running or not self.waiting:
            return 0.0
        return min(s.arrival_s for s in self.waiting)

    def add(self, request: Request, now: float) -> SeqState:
        """Validate and queue a request; raises before anything is held."""
        self._validate(request)
        limits = self.limits
        tokens = self._token_source(
            token_seed(self.config.seed, request, self._hash_tuple),
            limits.vocab_size,
            limits.eos_token_ids,
        )
        low = max(request.min_tokens, 1)
        stop_at = (
            request.max_tokens
            if request.ignore_eos
            else tokens.natural_length(low, request.max_tokens)
        )
        tokens.expect(stop_at)
        seq = SeqState(request=request, arrival_s=now, tokens=tokens, stop_at=stop_at)
        self.live[request.request_id] = seq
        self.waiting.append(seq)
        return seq

    def _validate(self, r: Request) -> None:
        if r.request_id in self.live or self.kv.is_kept(r.request_id):
            raise DuplicateRequestError(f"request_id {r.request_id!r} is already in flight")
        limits = self.limits
        check_request(r, limits.max_context, limits.kv_capacity_tokens, self.config.block_size)

    def abort(self, request_id: str) -> SeqState | None:
        """Drop a live request and free its slot and KV now."""
        seq = self.live.get(request_id)
        if seq is None:
            return None
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.counters.aborted += 1
        self._finish(seq, FinishReason.ABORT)
        return seq

    def schedule(self, now: float) -> Step | None:
        """Plan the step starting at `now`: running sequences first, then admissions in order."""
        budget = self.config.max_num_batched_tokens
        queries = self.limits.draft_tokens + 1
        kv = self.kv
        scheduled: list[tuple[SeqState, int, bool]] = []
        running = self.running
        i = 0
        add = scheduled.append
        lora = self.lora
        skipped: list[SeqState] = []
        # The step's batch for the cost model, built as sequences are scheduled (one pass).
        decode: list[int] = []
        prefill: list[PrefillChunk] = []
        size = kv.block_size
        caching = kv.caching
        while i < len(running) and budget > 0:
            seq = running[i]
            computed = seq.computed
            done = len(seq.output_ids)
            left = seq.prompt_len + done - computed
            decoding = left == 1 and done > 0
            n = left if left < budget else budget
            # Room for the drafts a decode step verifies, but never past the request's end.
            kv_tokens = computed + (queries if decoding else n)
            if kv_tokens > seq.max_kv_tokens:
                kv_tokens = seq.max_kv_tokens
            # Most steps of a sequence need no new block and fill none: `allocate_slots`
            # would do nothing, so its call (a Python call per sequence per step) is skipped.
            if (
                (
                    kv_tokens > seq.blocks * size
                    or (caching and (computed + n) // size > seq.cached_blocks)
                )
                and not kv.allocate_slots(seq, kv_tokens, computed + n)
                and not self._make_room(seq, kv_tokens, computed + n)
            ):
                continue  # seq itself was preempted; running[i] is now the next one
            add((seq, n, decoding))
            if decoding:
                decode.append(computed)
            else:
                prefill.append(PrefillChunk(n, computed, computed + n == seq.prompt_len + done))
            budget -= n
            i += 1
        while (
            self.waiting
            and budget > 0
            and len(running) < self.config.max_num_seqs
            and self.waiting[0].arrival_s <= now
        ):
            seq = self.waiting[0]  # holds no blocks and has computed nothing
            if lora is not None and not lora.admits(
                seq.request.lora, (s.request.lora for s in running)
            ):
                skipped.append(self.waiting.popleft())  # its adapter would be one too many
                continue
            total = seq.total_tokens
            hit = kv.get_computed_blocks(seq)
            computed = hit.num_tokens
            if seq.request.kv_transferred and not seq.preemptions:
                computed = total - 1
            n = min(total - computed, budget)
            if not kv.allocate_slots(seq, computed + n, computed + n, new_computed=hit):
                break
            seq.computed = computed
            self.waiting.popleft()
            running.append(seq)
            if seq.first_scheduled_s is None:
                seq.cached_tokens = hit.num_tokens
                seq.first_scheduled_s = now
            scheduled.append((seq, n, False))
            prefill.append(PrefillChunk(n, computed, computed + n == total))
            budget -= n
        if skipped:  # back at the head, in their order: they keep their turn
            self.waiting.extendleft(reversed(skipped))
        if not scheduled:
            return None
        cost = self.step_model.step_cost(Batch(decode_contexts=decode, prefill=prefill))
        if lora is not None:
            cost = lora.cost(cost, [(s.request.lora, n) for s, n, _ in scheduled])
        tokens = self.config.max_num_batched_tokens - budget
        return Step(now, now + cost.time_s, cost, scheduled, tokens)

    def _make_room(self, seq: SeqState, kv_tokens: int, filled_tokens: int) -> bool:
        """Preempt the latest admitted until `seq` gets its blocks (`allocate_slots`);
        False if `seq` itself was preempted."""
        while True:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
            if self.kv.allocate_slots(seq, kv_tokens, filled_tokens):
                return True

    def _preempt(self, seq: SeqState) -> None:
        """Recompute-style preemption: drop its KV, requeue it first."""
        self.running.remove(seq)
        self.kv.free(seq)
        seq.computed = 0
        seq.preemptions += 1
        self.counters.preemptions += 1
        self.waiting.appendleft(seq)

    def complete(self, step: Step) -> list[Emission]:
        """Apply a step at its end: advance prefill, sample tokens, finish sequences."""
        emissions: list[Emission] = []
        emit = emissions.append
        end_s = step.end_s
        energy_per_token = step.cost.energy_j / step.tokens
        counters = self.counters
        counters.steps += 1
        counters.energy_j += step.cost.energy_j
        plain = not self.limits.draft_tokens  # one token a step: no draws for drafts
        generated = 0
        for seq, n, decoding in step.scheduled:
            if seq.finish_reason is not None:
                continue  # aborted during the step
            seq.energy_j += energy_per_token * n
            out = seq.output_ids
            done = len(out)
            # A step's tokens stop where the sequence samples: computed <= prompt + output.
            seq.computed = computed = seq.computed + n
            if computed < seq.prompt_len + done:
                continue  # a prefill chunk that does not end the prompt
            if plain and seq.stop_at - done > 1 and not seq.watches_stops:
                # `_sample`'s answer when nothing can end the sequence this step; the new
                # token's KV is the next step's, so `computed` (prompt + output) stands.
                # `next_ids(1)` inlined where the source has ids in hand (nearly always).
                tokens = seq.tokens
                ids = [tokens._ids.pop()] if tokens._ids else tokens.next_ids(1)
                out.append(ids[0])
                generated += 1
                reason = None
            else:
                ids, reason = self._sample(seq, decoding)
                out.extend(ids)
                # Accepted drafts were verified in this step, so their KV exists.
                seq.computed = seq.prompt_len + len(out) - 1
                generated += len(ids)
            previous_s = seq.last_token_s
            seq.last_token_s = end_s
            if seq.first_token_s is None:
                seq.first_token_s = end_s
            if reason is not None:
                self.running.remove(seq)
                counters.finished += 1
                self._finish(seq, reason)
            emit(Emission(seq, ids, end_s, reason is not None, previous_s))
        counters.tokens_generated += generated
        return emissions

    def _sample(self, seq: SeqState, decoding: bool) -> tuple[list[int], FinishReason | None]:
        r = seq.request
        k = 1
        if decoding and self.limits.draft_tokens:
            k += seq.tokens.accepted_drafts(self.limits.draft_tokens, self.limits.acceptance_rate)
        done = len(seq.output_ids)
        left = seq.stop_at - done
        if k > left:
            k = left
        ids = seq.tokens.next_ids(k)
        if seq.watches_stops:
            for j, token in enumerate(ids):
                if token in r.stop_token_ids and done + j + 1 >= r.min_tokens:
                    return ids[: j + 1], FinishReason.STOP
        if k < left:
            return ids, None
        if seq.stop_at < r.max_tokens and self.limits.eos_token_ids:
            ids[-1] = min(self.limits.eos_token_ids)
            return ids, FinishReason.STOP
        return ids, FinishReason.LENGTH if seq.stop_at == r.max_tokens else FinishReason.STOP

    def _finish(self, seq: SeqState, reason: FinishReason) -> None:
        seq.finish_reason = reason
        if seq.request.keep_kv and reason is not FinishReason.ABORT:
            self.kv.keep(seq)  # until `kv.release_kept`: a transfer reads them
        else:
            self.kv.free(seq)
        del self.live[seq.request.request_id]

    @property
    def kv_used_tokens(self) -> int:
        return self.kv.used_tokens
