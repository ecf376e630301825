"""EngineCore without a clock: schedule(now) and complete(step) called in turn by the test."""

from __future__ import annotations

import dataclasses
import inspect
import random
from array import array
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from engine_fakes import FakeStepModel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memorywall.errors import (
    ContextLengthError,
    DuplicateRequestError,
    InvalidRequestError,
    RequestTooLargeError,
)
from memorywall.server.engine import kernel
from memorywall.server.engine.build import build_core
from memorywall.server.engine.scheduler import (
    Emission,
    EngineConfig,
    EngineCore,
    FinishReason,
    ModelLimits,
    Request,
    SeqState,
    Step,
)
from memorywall.server.engine.tokens import CompiledTokenSource, TokenSource

EOS = 0  # the fake vocabulary's only EOS id; 0 + 1 is an ordinary id
VOCAB = 32_000
MAX_STEPS = 100_000  # any run longer than this is a livelock


def limits(**overrides) -> ModelLimits:
    values = {
        "kv_capacity_tokens": 64 * 1024,
        "max_context": 8192,
        "vocab_size": VOCAB,
        "eos_token_ids": frozenset({EOS}),
    }
    values.update(overrides)
    return ModelLimits(**values)


def make_core(config: EngineConfig | None = None, **limit_overrides) -> EngineCore:
    return EngineCore(FakeStepModel(), limits(**limit_overrides), config or EngineConfig())


def request(rid: str, prompt_len: int = 8, max_tokens: int = 16, **kw) -> Request:
    return Request(
        request_id=rid,
        prompt_ids=tuple(range(1, prompt_len + 1)),
        max_tokens=max_tokens,
        **kw,
    )


def test_request_init_is_the_dataclass_fields():
    """Request writes its __init__ out (speed): same fields, order and defaults, still frozen."""
    params = inspect.signature(Request.__init__).parameters
    fields = dataclasses.fields(Request)
    assert list(params)[1:] == [f.name for f in fields]
    for f in fields:
        p = params[f.name]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY
        assert p.default == (
            inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        )
    r = request("r", sampling_seed=7)
    assert dataclasses.asdict(r)["sampling_seed"] == 7
    assert dataclasses.replace(r, max_tokens=3) == request("r", 8, 3, sampling_seed=7)
    assert hash(r) == hash(request("r", sampling_seed=7))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.max_tokens = 1  # type: ignore[misc]


@dataclass
class Run:
    steps: list[Step] = field(default_factory=list)
    emissions: dict[str, list[Emission]] = field(default_factory=lambda: defaultdict(list))
    now: float = 0.0

    def ids(self, rid: str) -> list[int]:
        return [t for e in self.emissions[rid] for t in e.token_ids]


def step_once(core: EngineCore, run: Run) -> Step | None:
    step = core.schedule(run.now)
    if step is None:
        return None
    for e in core.complete(step):
        run.emissions[e.sequence.request.request_id].append(e)
    run.steps.append(step)
    run.now = step.end_s
    return step


def run_to_completion(core: EngineCore, run: Run | None = None) -> Run:
    run = run or Run()
    for _ in range(MAX_STEPS):
        if not core.has_work():
            return run
        assert step_once(core, run) is not None, "work left but nothing could be scheduled"
    raise AssertionError("engine did not finish: livelock")


def generate(core: EngineCore, req: Request) -> SeqState:
    seq = core.add(req, 0.0)
    run_to_completion(core)
    return seq


# --- batching -------------------------------------------------------------------------------


def test_request_added_while_first_decodes_joins_next_step():
    core = make_core()
    a = core.add(request("a", max_tokens=50, ignore_eos=True), 0.0)
    run = Run()
    step_once(core, run)  # prefill a
    step_once(core, run)  # a decodes
    assert len(a.output_ids) == 2
    b = core.add(request("b", max_tokens=50, ignore_eos=True), run.now)
    step = step_once(core, run)
    scheduled = {s.request.request_id: (n, decoding) for s, n, decoding in step.scheduled}
    assert scheduled == {"a": (1, True), "b": (8, False)}
    assert b.first_scheduled_s == step.start_s
    step = step_once(core, run)
    assert {s.request.request_id for s, _, _ in step.scheduled} == {"a", "b"}
    assert all(decoding for _, _, decoding in step.scheduled)


def test_chunked_prefill_respects_token_budget():
    core = make_core(EngineConfig(max_num_batched_tokens=256))
    seq = core.add(request("long", prompt_len=1000, max_tokens=4, ignore_eos=True), 0.0)
    run = Run()
    chunks = []
    for _ in range(4):
        step = step_once(core, run)
        assert sum(n for _, n, _ in step.scheduled) <= 256
        chunks.append(step.scheduled[0][1])
        assert not step.scheduled[0][2]
    assert chunks == [256, 256, 256, 232]
    assert not run.emissions["long"][:-1]
    assert [len(e.token_ids) for e in run.emissions["long"]] == [1]
    assert seq.first_token_s == run.steps[3].end_s
    # The chunk that ends the prompt is the only one that needs the LM head.
    prefill_flags = [b.prefill[0].last for b in core.step_model.batches[:4]]
    assert prefill_flags == [False, False, False, True]
    assert [b.prefill[0].cached_tokens for b in core.step_model.batches[:4]] == [0, 256, 512, 768]
    run_to_completion(core, run)
    assert len(seq.output_ids) == 4


def test_max_num_seqs_bounds_the_running_batch():
    core = make_core(EngineConfig(max_num_seqs=3))
    seqs = [core.add(request(f"r{i}", max_tokens=10, ignore_eos=True), 0.0) for i in range(10)]
    run = Run()
    while core.has_work():
        step = step_once(core, run)
        assert len(step.scheduled) <= 3
        assert len(core.running) <= 3
    assert all(len(s.output_ids) == 10 for s in seqs)
    assert core.counters.finished == 10


# --- KV admission, preemption, abort --------------------------------------------------------


# Requests here share their prompts; prefix caching (tests/server/test_prefix_cache.py) would
# let them share KV, so the plain accounting is tested with it off.
NO_PREFIX_CACHING = EngineConfig(block_size=16, enable_prefix_caching=False)


def test_requests_wait_for_kv_until_it_frees():
    core = make_core(NO_PREFIX_CACHING, kv_capacity_tokens=64)  # 4 blocks
    a = core.add(request("a", prompt_len=40, max_tokens=8, ignore_eos=True), 0.0)  # 3 blocks
    b = core.add(request("b", prompt_len=40, max_tokens=8, ignore_eos=True), 0.0)
    run = Run()
    step_once(core, run)
    assert core.running == [a]
    assert list(core.waiting) == [b]
    assert core.kv.pool.free_blocks == 1
    while a.finish_reason is None:
        step_once(core, run)
        if a.finish_reason is None:
            assert list(core.waiting) == [b]
    a_done = a.last_token_s
    run_to_completion(core, run)
    assert b.first_scheduled_s >= a_done
    assert len(b.output_ids) == 8
    assert core.counters.preemptions == 0
    assert core.kv.pool.free_blocks == core.kv.pool.total_blocks


def test_preemption_requeues_at_front_and_still_finishes():
    def workload(core: EngineCore) -> list[SeqState]:
        return [
            core.add(request(f"r{i}", prompt_len=16, max_tokens=24, ignore_eos=True), 0.0)
            for i in range(3)
        ]

    big = make_core(EngineConfig(block_size=16))
    expected = workload(big)
    run_to_completion(big)

    core = make_core(EngineConfig(block_size=16), kv_capacity_tokens=96)  # 6 blocks for 3 x 3
    seqs = workload(core)
    run = Run()
    seen_preemption = False
    for _ in range(MAX_STEPS):
        if not core.has_work():
            break
        before = {id(s): s.preemptions for s in seqs}
        step_once(core, run)
        victims = [s for s in seqs if s.preemptions > before[id(s)]]
        if victims:
            seen_preemption = True
            # Preempted last-admitted first; each requeued ahead of everything else.
            assert core.waiting[0] in victims
            for v in victims:
                assert v.blocks == 0 and v.computed == 0
                assert v in core.waiting or v in core.running
    assert seen_preemption
    assert core.counters.preemptions > 0
    assert core.counters.preemptions == sum(s.preemptions for s in seqs)
    for seq, ref in zip(seqs, expected, strict=True):
        assert seq.finish_reason is FinishReason.LENGTH
        assert seq.output_ids == ref.output_ids  # recompute changes nothing the client sees
        assert run.ids(seq.request.request_id) == list(seq.output_ids)
    assert core.kv.pool.free_blocks == core.kv.pool.total_blocks


def test_abort_waiting_request_frees_everything_at_once():
    core = make_core(NO_PREFIX_CACHING, kv_capacity_tokens=64)
    a = core.add(request("a", prompt_len=40, max_tokens=8, ignore_eos=True), 0.0)
    b = core.add(request("b", prompt_len=40, max_tokens=8, ignore_eos=True), 0.0)
    run = Run()
    step_once(core, run)
    assert list(core.waiting) == [b]
    assert core.abort("b") is b
    assert b.finish_reason is FinishReason.ABORT
    assert not core.waiting and "b" not in core.live
    assert core.kv.pool.free_blocks == core.kv.pool.total_blocks - a.blocks
    run_to_completion(core, run)
    assert "b" not in run.emissions
    assert core.counters.aborted == 1
    assert core.kv.pool.free_blocks == core.kv.pool.total_blocks


def test_abort_running_request_mid_step_emits_nothing_for_it():
    core = make_core()
    a = core.add(request("a", prompt_len=100, max_tokens=50, ignore_eos=True), 0.0)
    b = core.add(request("b", prompt_len=100, max_tokens=50, ignore_eos=True), 0.0)
    run = Run()
    step_once(core, run)
    step = core.schedule(run.now)
    assert {s.request.request_id for s, _, _ in step.scheduled} == {"a", "b"}
    assert core.abort("a") is a
    assert core.kv.pool.used_blocks == b.blocks  # a's blocks back before the step ends
    emissions = core.complete(step)
    assert [e.sequence for e in emissions] == [b]
    assert len(a.output_ids) == 1
    assert core.abort("a") is None
    assert core.abort("never-added") is None
    assert core.abort("b") is b
    assert core.kv.pool.free_blocks == core.kv.pool.total_blocks
    assert not core.has_work()
    assert core.counters.aborted == 2


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"max_tokens": 0}, InvalidRequestError, "max_tokens"),
        ({"max_tokens": 4, "min_tokens": 5}, InvalidRequestError, "min_tokens"),
        ({"prompt_len": 0}, InvalidRequestError, "prompt"),
        ({"prompt_len": 4000, "max_tokens": 200}, ContextLengthError, "context window"),
        ({"prompt_len": 2000, "max_tokens": 100}, RequestTooLargeError, "KV capacity"),
    ],
)
def test_invalid_requests_raise_before_anything_is_held(kwargs, error, words):
    core = make_core(EngineConfig(block_size=16), kv_capacity_tokens=2048, max_context=4096)
    core.add(request("other", max_tokens=4), 0.0)
    with pytest.raises(error, match=words) as info:
        core.add(request("bad", **kwargs), 0.0)
    assert type(info.value) is error
    assert set(core.live) == {"other"}
    assert [s.request.request_id for s in core.waiting] == ["other"]
    assert core.kv.pool.free_blocks == core.kv.pool.total_blocks


def test_request_exactly_filling_context_and_kv_is_accepted():
    core = make_core(EngineConfig(block_size=16), kv_capacity_tokens=2048, max_context=2048)
    seq = generate(core, request("full", prompt_len=2000, max_tokens=48, ignore_eos=True))
    assert len(seq.output_ids) == 48


def test_duplicate_live_request_id_is_rejected_until_it_finishes():
    core = make_core()
    first = core.add(request("dup", max_tokens=3, ignore_eos=True), 0.0)
    with pytest.raises(DuplicateRequestError, match="dup"):
        core.add(request("dup", max_tokens=5), 0.0)
    assert core.live == {"dup": first}
    assert len(core.waiting) == 1
    run_to_completion(core)
    again = generate(core, request("dup", max_tokens=5, ignore_eos=True))
    assert len(again.output_ids) == 5
    # Aborted ids are free again too.
    core.add(request("dup", max_tokens=5), 0.0)
    core.abort("dup")
    core.add(request("dup", max_tokens=5), 0.0)


# --- tokens ---------------------------------------------------------------------------------


def test_same_seed_same_tokens_different_seed_different_tokens():
    def ids(seed: int, **kw) -> list[int]:
        core = make_core(EngineConfig(seed=seed))
        return generate(core, request("r", max_tokens=40, ignore_eos=True, **kw)).output_ids

    assert ids(7) == ids(7)
    assert ids(7) != ids(8)
    assert ids(7, sampling_seed=1) == ids(7, sampling_seed=1)
    assert ids(7, sampling_seed=1) != ids(7, sampling_seed=2)


def test_tokens_do_not_depend_on_what_else_is_batched():
    alone = make_core(EngineConfig(seed=3))
    ref = generate(alone, request("r", max_tokens=30, ignore_eos=True)).output_ids
    busy = make_core(EngineConfig(seed=3, max_num_batched_tokens=64))
    for i in range(5):
        busy.add(request(f"x{i}", prompt_len=50, max_tokens=30, ignore_eos=True), 0.0)
    seq = busy.add(request("r", max_tokens=30, ignore_eos=True), 0.0)
    run_to_completion(busy)
    assert seq.output_ids == ref


def test_ignore_eos_gives_exactly_max_tokens():
    core = make_core()
    for i in range(20):
        seq = generate(core, request(f"r{i}", max_tokens=1 + 7 * i, ignore_eos=True))
        assert len(seq.output_ids) == 1 + 7 * i
        assert seq.finish_reason is FinishReason.LENGTH
        assert EOS not in seq.output_ids


def test_natural_length_within_min_and_max_and_stop_ends_with_eos():
    core = make_core()
    reasons = set()
    for i in range(60):
        min_tokens = i % 3 * 5
        seq = generate(
            core, request(f"r{i}", max_tokens=30, min_tokens=min_tokens, sampling_seed=i)
        )
        n = len(seq.output_ids)
        assert max(min_tokens, 1) <= n <= 30
        reasons.add(seq.finish_reason)
        if n < 30:
            assert seq.finish_reason is FinishReason.STOP
            assert seq.output_ids[-1] == EOS
        if seq.finish_reason is FinishReason.LENGTH:
            assert n == 30
        assert EOS not in seq.output_ids[:-1]
    assert FinishReason.STOP in reasons


def test_stop_token_ids_end_the_request_with_stop():
    # A small vocabulary, so a chosen stop token turns up in most outputs.
    stopped = 0
    for i in range(20):
        kw = {"max_tokens": 200, "min_tokens": 20, "sampling_seed": i}
        base = generate(make_core(vocab_size=50), request(f"r{i}", **kw)).output_ids
        seq = generate(
            make_core(vocab_size=50), request(f"r{i}", stop_token_ids=frozenset({7}), **kw)
        )
        ids = seq.output_ids
        if seq.finish_reason is FinishReason.STOP and ids[-1] == 7:
            stopped += 1
            # The same draws up to the stop token (where the unconstrained run ends at that
            # very token, its last token is the EOS that run puts there instead).
            assert ids[:-1] == base[: len(ids) - 1] and len(ids) >= 20
        else:
            assert ids == base
        assert 7 not in ids[19:-1]  # never ignored once min_tokens is reached
    assert stopped >= 10


def test_ignore_eos_ignores_stop_token_ids_too():
    # As documented on the wire: ignore_eos generates exactly max_tokens.
    core = make_core(vocab_size=50)
    seq = generate(
        core, request("r", max_tokens=300, ignore_eos=True, stop_token_ids=frozenset({7}))
    )
    assert len(seq.output_ids) == 300
    assert seq.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("eos", [frozenset({3, 4}), frozenset({7})])
def test_output_ids_are_never_eos_and_always_in_vocabulary(eos):
    core = make_core(vocab_size=8, eos_token_ids=eos)
    seq = generate(core, request("r", prompt_len=4, max_tokens=400, ignore_eos=True))
    assert not set(seq.output_ids) & eos
    assert all(0 <= t < 8 for t in seq.output_ids)


def _sources() -> list[type[TokenSource]]:
    return [TokenSource] + ([CompiledTokenSource] if kernel.compiled is not None else [])


@pytest.mark.parametrize("source", _sources(), ids=lambda c: c.__name__)
def test_token_draws_come_in_one_order_however_they_are_taken(source):
    # Ids wait reversed in an array('q'): next_ids and next_each, any mix and size, hand
    # out the stream of one big draw, the same in every form.
    rng = random.Random(5)
    for seed in range(300):
        vocab, eos = rng.choice([(7, frozenset({0, 3})), (128_256, frozenset({128_001}))])
        whole = source(seed, vocab, eos)
        whole.expect(600)
        want = whole.next_each(600).tolist()
        parts = source(seed, vocab, eos)
        parts.expect(rng.choice([1, 20, 600]))
        got: list[int] = []
        while len(got) < 600:
            k = min(rng.choice([0, 1, 2, 17, 300]), 600 - len(got))
            if rng.random() < 0.5:
                ids = parts.next_ids(k)
                assert type(ids) is list and len(ids) == k
                got += ids
            else:
                got += parts.next_each(k).tolist()
        assert got == want
        assert not set(got) & eos and all(0 <= t < vocab for t in got)


def test_output_ids_are_machine_integers():
    seq = generate(make_core(), request("r", max_tokens=40, ignore_eos=True))
    assert isinstance(seq.output_ids, array) and seq.output_ids.typecode == "q"
    assert len(seq.output_ids) == 40


def test_speculative_decoding_emits_several_tokens_per_step_within_max_tokens():
    core = make_core(draft_tokens=3, acceptance_rate=0.8)
    seqs = [core.add(request(f"r{i}", max_tokens=37, ignore_eos=True), 0.0) for i in range(4)]
    seqs += [core.add(request(f"n{i}", max_tokens=37), 0.0) for i in range(4)]
    run = run_to_completion(core)
    sizes = [len(e.token_ids) for es in run.emissions.values() for e in es]
    assert max(sizes) > 1
    assert max(sizes) <= 4
    for seq in seqs:
        assert len(seq.output_ids) <= 37
        if seq.request.ignore_eos:
            assert len(seq.output_ids) == 37
            assert seq.finish_reason is FinishReason.LENGTH
    assert core.counters.steps < sum(len(s.output_ids) for s in seqs[:4])


# --- invariants under a random workload -----------------------------------------------------


def check_invariants(core: EngineCore, added: list[SeqState]) -> None:
    pool = core.kv.pool
    assert pool.used_blocks + pool.free_blocks == pool.total_blocks
    assert 0 <= pool.free_blocks <= pool.total_blocks
    live = list(core.live.values())
    # Prefix caching shares blocks: each referenced block counts once, each holder once.
    # ...and finished `keep_kv` requests keep theirs until released.
    taken = [b for s in live for b in s.block_ids] + [
        b for ids in core.kv.kept.values() for b in ids
    ]
    assert all(s.blocks == len(s.block_ids) for s in live)
    assert len(set(taken)) == pool.used_blocks
    assert sum(pool.ref_counts) == len(taken)
    assert {id(s) for s in live} == {id(s) for s in [*core.running, *core.waiting]}
    assert len(core.running) + len(core.waiting) == len(live)
    assert len(core.running) <= core.config.max_num_seqs
    for s in core.waiting:
        assert s.blocks == 0  # admission moves a sequence to running with its blocks
    assert sum(len(s.output_ids) for s in added) == core.counters.tokens_generated
    for s in added:
        assert len(s.output_ids) <= s.request.max_tokens
        if s.finish_reason is not None:
            assert s.blocks == 0


requests_strategy = st.lists(
    st.tuples(
        st.integers(0, 30),  # arrival step
        st.integers(1, 150),  # prompt tokens
        st.integers(1, 60),  # max tokens
        st.booleans(),  # ignore_eos
        st.integers(0, 10),  # min tokens
        st.one_of(st.none(), st.integers(1, 40)),  # abort after this many steps
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=requests_strategy,
    max_num_seqs=st.integers(1, 8),
    budget=st.integers(16, 300),
    kv_blocks=st.integers(14, 40),
    draft_tokens=st.sampled_from([0, 0, 2]),
)
def test_invariants_hold_after_every_step(specs, max_num_seqs, budget, kv_blocks, draft_tokens):
    core = make_core(
        EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, block_size=16),
        kv_capacity_tokens=kv_blocks * 16,
        draft_tokens=draft_tokens,
        acceptance_rate=0.7,
    )
    added: list[SeqState] = []
    abort_at: dict[int, list[str]] = defaultdict(list)
    times: dict[str, list[float]] = defaultdict(list)
    emitted: dict[str, int] = defaultdict(int)
    run = Run()
    pending = sorted(enumerate(specs), key=lambda x: x[1][0])
    aborted = False
    for step_no in range(MAX_STEPS):
        while pending and pending[0][1][0] <= step_no:
            i, (_, prompt, max_tokens, ignore_eos, min_tokens, abort_after) = pending.pop(0)
            max_tokens = min(max_tokens, kv_blocks * 16 - prompt)
            req = request(
                f"r{i}",
                prompt_len=prompt,
                max_tokens=max_tokens,
                ignore_eos=ignore_eos,
                min_tokens=min(min_tokens, max_tokens),
            )
            added.append(core.add(req, run.now))
            if abort_after is not None:
                abort_at[step_no + abort_after].append(req.request_id)
        for rid in abort_at.pop(step_no, []):
            aborted |= core.abort(rid) is not None
        check_invariants(core, added)
        if not core.has_work():
            if not pending:
                break
            continue
        step = core.schedule(run.now)
        assert step is not None, "work left but nothing could be scheduled"
        assert sum(n for _, n, _ in step.scheduled) <= budget
        check_invariants(core, added)
        for e in core.complete(step):
            rid = e.sequence.request.request_id
            assert e.time_s == step.end_s
            times[rid].extend([e.time_s] * len(e.token_ids))
            emitted[rid] += len(e.token_ids)
            assert e.finished == (e.sequence.finish_reason is not None)
        run.now = step.end_s
        check_invariants(core, added)
    else:
        raise AssertionError("engine did not finish: livelock")

    assert not core.live
    assert core.kv.pool.free_blocks == core.kv.pool.total_blocks
    assert core.counters.finished + core.counters.aborted == len(added)
    for s in added:
        rid = s.request.request_id
        assert emitted[rid] == len(s.output_ids)
        assert times[rid] == sorted(times[rid])
        if s.finish_reason is FinishReason.LENGTH:
            assert len(s.output_ids) == s.request.max_tokens
        if s.request.ignore_eos and s.finish_reason is not FinishReason.ABORT:
            assert len(s.output_ids) == s.request.max_tokens
        if s.finish_reason is not FinishReason.ABORT:
            assert len(s.output_ids) >= max(s.request.min_tokens, 1)
    if not aborted:
        total = sum(s.energy_j for s in added)
        assert total == pytest.approx(core.counters.energy_j, rel=1e-9)


def test_energy_of_finished_sequences_sums_to_engine_energy():
    core = make_core(EngineConfig(max_num_batched_tokens=128, max_num_seqs=4))
    seqs = [
        core.add(request(f"r{i}", prompt_len=30 + 17 * i, max_tokens=5 + 3 * i), 0.0)
        for i in range(10)
    ]
    run_to_completion(core)
    assert all(s.finish_reason in (FinishReason.LENGTH, FinishReason.STOP) for s in seqs)
    assert sum(s.energy_j for s in seqs) == pytest.approx(core.counters.energy_j, rel=1e-9)
    assert core.counters.energy_j > 0


# --- against the real performance core ------------------------------------------------------


def test_real_step_model_times_a_wse3_request(wse3_8b):
    core, card = build_core(wse3_8b, EngineConfig())
    seq = core.add(
        Request(request_id="r", prompt_ids=tuple(range(1, 101)), max_tokens=20, ignore_eos=True),
        0.0,
    )
    run = run_to_completion(core)
    decode_steps = [s.end_s - s.start_s for s in run.steps[1:]]
    assert len(seq.output_ids) == 20
    assert all(4e-4 < t < 7e-4 for t in decode_steps)  # ~0.56 ms
    assert seq.first_token_s == run.steps[0].end_s
    assert seq.last_token_s == run.steps[-1].end_s
    assert seq.energy_j == pytest.approx(core.counters.energy_j, rel=1e-9)
    assert card.kv_capacity_tokens == core.kv.pool.capacity_tokens
