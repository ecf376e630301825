"""Synthetic prompt token ids, a function of (salt, request) only.

A request's own tokens come from a generator seeded by (salt, request index); a
shared-prefix group's first tokens from one seeded by (salt, group). The OpenAI
targets send these ids (completions), so any worker process builds any request's
prompt alone. The offline simulator, one process that sees every request in a fixed
order, uses `PromptSource`: the same group prefixes, and each request's own tokens
drawn in turn from one generator (seeding a generator per request costs more than
the rest of simulating it).

Mooncake traces (`spec.hash_ids`): each hash id is a block of `spec.block_tokens` ids
from a generator seeded by (salt, id), so equal ids are equal blocks wherever they sit.
Multi-turn sessions (`spec.session`): turn t of a session resends every earlier turn's
message and answer and then its own message; message and answer j are drawn from
generators seeded by (salt, session, j), so each turn's prompt begins with the last
turn's whole prompt. The answer resent is this stand-in of the answer's length, not the
server's tokens: the engine caches prompts, so a turn hits its previous turn's prompt
(earlier answers included) and misses only the newest answer, in bench and simulate
alike (a real client resending the served text would hit that answer too, on a server
that caches decoded tokens).
"""

from __future__ import annotations

import numpy as np

from memorywall.loadgen.records import RequestSpec

__all__ = [
    "TOKEN_ID_HIGH",
    "TOKEN_ID_LOW",
    "PromptSource",
    "carries_ids",
    "hash_block_rng",
    "prefix_rng",
    "prompt_rng",
    "prompt_token_ids",
    "shared_tokens",
    "spec_token_ids",
    "turn_rng",
]

TOKEN_ID_LOW = 1000
TOKEN_ID_HIGH = 30000  # fits every common vocabulary


def prompt_rng(salt: int, index: int) -> np.random.Generator:
    """One request's prompt generator: a function of (salt, index) only."""
    return np.random.default_rng([salt, int(index < 0), abs(index)])


def prefix_rng(salt: int, group: int) -> np.random.Generator:
    """A shared-prefix group's generator: a function of (salt, group) only, apart from
    every request's own `prompt_rng`."""
    return np.random.default_rng([salt, 2, abs(int(group))])


def hash_block_rng(salt: int, hash_id: int) -> np.random.Generator:
    """A Mooncake hash id's block generator: a function of (salt, id) only."""
    return np.random.default_rng([salt, 4, hash_id])


def turn_rng(salt: int, session: int, turn: int, *, answer: bool) -> np.random.Generator:
    """The generator of a session turn's user message (or its answer's stand-in)."""
    return np.random.default_rng([salt, 5 + int(answer), session, turn])


def carries_ids(spec: RequestSpec) -> bool:
    """Whether a request's prompt must be sent as ids (its tokens are shared with others),
    rather than as a length the server fills in."""
    return spec.prefix_group is not None or bool(spec.hash_ids) or spec.session is not None


def prompt_token_ids(n: int, rng: np.random.Generator) -> list[int]:
    return rng.integers(TOKEN_ID_LOW, TOKEN_ID_HIGH, size=n).tolist()


def shared_tokens(spec: RequestSpec) -> int:
    """How many of the prompt's first tokens its prefix group shares (0: no group)."""
    if spec.prefix_group is None:
        return 0
    return min(spec.prefix_tokens, spec.prompt_tokens)


def spec_token_ids(spec: RequestSpec, salt: int) -> list[int]:
    """All `spec.prompt_tokens` ids: the group's shared prefix, then the request's own
    (or a trace's hash blocks, or a session turn's conversation)."""
    if spec.hash_ids:
        return hash_token_ids(spec, salt)
    if spec.session is not None:
        return [i for part in turn_parts(spec, salt, prompt_token_ids) for i in part]
    shared = shared_tokens(spec)
    prefix = prompt_token_ids(shared, prefix_rng(salt, spec.prefix_group or 0)) if shared else []
    return prefix + prompt_token_ids(spec.prompt_tokens - shared, prompt_rng(salt, spec.index))


def hash_token_ids(spec: RequestSpec, salt: int) -> list[int]:
    """A Mooncake request's ids: its hash blocks in order, cut to `prompt_tokens`; tokens
    beyond the last block (a trace may list fewer blocks) are the request's own."""
    out: list[int] = []
    size, n = spec.block_tokens, spec.prompt_tokens
    for hash_id in spec.hash_ids:
        if len(out) >= n:
            break
        out += prompt_token_ids(min(size, n - len(out)), hash_block_rng(salt, hash_id))
    if len(out) < n:
        out += prompt_token_ids(n - len(out), prompt_rng(salt, spec.index))
    return out


def turn_parts(spec: RequestSpec, salt: int, draw):
    """A session turn's prompt as its parts, in order: each earlier turn's message and
    answer, then its own message; `draw(n, rng)` makes one part (ids or text)."""
    session = spec.session or 0
    parts = []
    for j, (message, answer) in enumerate(spec.history):
        parts.append(draw(message, turn_rng(salt, session, j, answer=False)))
        parts.append(draw(answer, turn_rng(salt, session, j, answer=True)))
    own = spec.prompt_tokens - sum(m + a for m, a in spec.history)
    parts.append(draw(own, turn_rng(salt, session, spec.turn, answer=False)))
    return parts


class PromptSource:
    """Prompt ids for requests taken in a fixed order: group prefixes as `spec_token_ids`
    builds them; each request's own tokens are `FRESH` new draws of one generator, then a
    window at a drawn offset of a fixed random `CORPUS`. The fresh draws make every
    prompt's KV block chain its own (a block's hash covers all tokens before it), so no
    prompt hits another's cache; drawing all its tokens cost more than the rest of
    simulating the request."""

    FRESH = 32
    CORPUS = 1 << 16
    BATCH = 1024  # requests' fresh draws and offsets drawn at once

    def __init__(self, salt: int) -> None:
        self.salt = salt
        self._rng = np.random.default_rng([salt, 3])
        # A tuple: a window of it is a prompt's tail with one copy (from a list, the slice,
        # the list grown and the tuple made of it were three copies, ~4 us a request).
        self._corpus = tuple(prompt_token_ids(self.CORPUS, self._rng))
        self._prefixes: dict[int, list[int]] = {}
        # The batch of fresh draws, taken from its end: `_left` of them remain.
        self._fresh: tuple[int, ...] = ()
        self._left = 0
        self._offsets: list[int] = []

    def _own(self, n: int) -> tuple[int, ...]:
        """`n` ids: `FRESH` new draws, then a window of the corpus (wrapping)."""
        if n <= 0:  # a prompt its group's prefix covers
            return ()
        # Prompts under `FRESH` tokens use up the offsets before the fresh draws.
        if self._left < self.FRESH or not self._offsets:
            self._fresh = tuple(prompt_token_ids(self.FRESH * self.BATCH, self._rng))
            self._left = len(self._fresh)
            self._offsets = self._rng.integers(0, self.CORPUS, size=self.BATCH).tolist()
        fresh = min(n, self.FRESH)
        left = self._left - fresh
        self._left = left
        at = self._offsets.pop()
        rest = n - fresh
        corpus = self._corpus
        if rest <= self.CORPUS - at:  # the window does not wrap: one slice, one concatenation
            return self._fresh[left : left + fresh] + corpus[at : at + rest]
        out = self._fresh[left : left + fresh]
        while len(out) < n:
            take = min(n - len(out), self.CORPUS - at)
            out += corpus[at : at + take]
            at = 0
        return out

    def token_ids(self, spec: RequestSpec) -> tuple[int, ...]:
        if spec.hash_ids or spec.session is not None:  # as the targets build them
            return tuple(spec_token_ids(spec, self.salt))
        shared = shared_tokens(spec)
        own = self._own(spec.prompt_tokens - shared)
        if not shared:
            return own
        group = spec.prefix_group or 0
        prefix = self._prefixes.get(group)
        if prefix is None or len(prefix) < shared:
            prefix = prompt_token_ids(shared, prefix_rng(self.salt, group))
            self._prefixes[group] = prefix
        return (*prefix[:shared], *own)
