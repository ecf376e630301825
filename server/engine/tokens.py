"""Synthetic but deterministic tokens: same seed and request, same output.

Prompt text is counted at about four characters per token (the usual rule
of thumb for BPE tokenizers on English text); output ids map to short words.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable
from functools import partial

import numpy as np

from memorywall.server.engine import kernel

CHARS_PER_TOKEN = 4
# Output text is one of these words per token, each with a leading space. They
# are among the most frequent English words, so " word" is a single token in
# GPT-2's BPE and in Llama 3's tiktoken-derived vocabulary; both split text into
# pre-tokens at " word" boundaries, so a client that re-tokenizes the streamed
# text counts exactly the tokens the server reports.
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "at",
    "this",
    "from",
    "or",
    "an",
    "are",
    "not",
    "but",
    "have",
    "all",
    "can",
    "more",
    "one",
    "time",
    "so",
    "we",
    "they",
    "he",
    "she",
    "you",
    "will",
    "has",
    "had",
]


def digest(*parts: object) -> int:
    """A stable 64-bit hash of the parts (Python's hash() is salted per process)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def count_text_tokens(text: str) -> int:
    return max(1, -(-len(text) // CHARS_PER_TOKEN))


def text_token_ids(text: str, vocab_size: int) -> tuple[int, ...]:
    """Stand-in ids for prompt text: one per four-character piece."""
    pieces = [text[i : i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN)]
    return tuple(digest(p) % vocab_size for p in pieces) or (0,)


def synthetic_prompt(count: int, seed: int, vocab_size: int) -> tuple[int, ...]:
    rng = np.random.default_rng(seed)
    return tuple(int(x) for x in rng.integers(0, vocab_size, size=count))


def token_text(token_id: int) -> str:
    return " " + _WORDS[token_id % len(_WORDS)]


_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment: 2^64 / the golden ratio
_MASK = (1 << 64) - 1
_TOKEN_STREAM, _LENGTH_STREAM, _DRAFT_STREAM = 0, 1, 2
_TABLE_LEN = 4096


def _splitmix_one(x: int) -> int:
    """splitmix64's output function (a 64-bit mix of a counter)."""
    x &= _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


_TABLE = np.random.default_rng(0x746F6B656E73).integers(
    0, np.iinfo(np.uint64).max, _TABLE_LEN, dtype=np.uint64, endpoint=True
)  # fixed random 64-bit words, one per position of a block of ids
_MIX = np.uint64(0xD6E8FEB86659FD93)  # odd: multiplying by it spreads low-bit changes up
_HIGH = np.uint64(32)


# An empty array of token ids: what `SeqState.output_ids` (and its block table and block
# hashes) and a source's drawn block are. Ids as machine integers: the engine only stores,
# counts and hashes them, and a list of ints cost a Python object touched per token (an
# increment on store, a decrement when the list dies, a hash call per token hashed), a
# quarter of the offline engine's time. A partial, not a def: it is called three times a
# request, and calling a partial of a C type makes no Python frame.
ids_array: Callable[[], array[int]] = partial(array, "q")

_ONE_ID = array("q", [0])  # repeated, the fastest way to a zeroed array of n ids


class TokenSource:
    """Output ids for one request: uniform over the vocabulary, never an EOS id.

    Ids come in blocks of `_TABLE_LEN` positions: id i of block b is a fixed random word
    for position i, XORed with a key that splitmix64 makes of (seed, b), multiplied by an
    odd constant and reduced to the vocabulary from its high bits, so another seed gives
    other ids, not a shifted copy. A source costs nothing to create and a few numpy calls
    per block (seeding a numpy Generator per request cost ~20 us, a tenth of simulating
    one). Same seed, same ids, on every machine.

    Drawn ids wait in `_ids`, an `array('q')` in reverse draw order (the next id is
    `_ids.pop()`, O(1) from the end).
    """

    BLOCK = 256
    MAX_BLOCK = 4096

    def __init__(self, seed: int, vocab_size: int, eos_ids: frozenset[int]) -> None:
        self._seed = seed & _MASK
        self._vocab = vocab_size
        self._eos = eos_ids
        self._ids = ids_array()
        self._drawn = 0  # token draws so far
        self._drafts = 0  # draft-acceptance draws so far
        self._block = self.BLOCK

    def expect(self, n: int) -> None:
        """About `n` ids will be asked for: draw them in one block (at most `MAX_BLOCK`)."""
        self._block = max(1, min(n, self.MAX_BLOCK))

    def _key(self, stream: int, index: int) -> int:
        """Draw `index` of one of the request's streams: 64 mixed bits."""
        return _splitmix_one(_splitmix_one(self._seed ^ (stream * _GOLDEN)) + index * _GOLDEN)

    def next_ids(self, n: int) -> list[int]:
        """The next `n` ids, as a list (what an emission carries)."""
        ids = self._ids
        if len(ids) < n:
            # Popped from the end, so keep the block reversed to hand ids out in draw order.
            drawn = self._draw(max(self._next_block(), n))
            self._ids = ids = drawn + ids if ids else drawn
        if n == 1:
            return [ids.pop()]
        if n < 1:
            return []  # (`del ids[-0:]` would empty the block)
        out = ids[: -n - 1 : -1].tolist()  # the last n, last first: in draw order
        del ids[-n:]
        return out

    def next_each(self, k: int) -> array[int]:
        """The ids of `k` calls of `next_ids(1)`, as one array (the offline fast path:
        `output_ids.extend` of it copies machine integers, no int object is made)."""
        out = ids_array()
        while k:
            ids = self._ids
            if not ids:
                self._ids = ids = self._draw(max(self._next_block(), k))
            m = min(k, len(ids))
            out += ids[: -m - 1 : -1]
            del ids[-m:]
            k -= m
        return out

    def _next_block(self) -> int:
        """What is left of the expected ids, or a block once past them."""
        left = self._block - self._drawn
        return left if left > 0 else self.BLOCK

    def _draw(self, n: int) -> array[int]:
        """The next `n` ids, EOS draws moved off EOS, in reverse draw order."""
        vocab = np.uint64(self._vocab)
        ids = ids_array()
        while len(ids) < n:
            block, at = divmod(self._drawn, _TABLE_LEN)
            take = min(n - len(ids), _TABLE_LEN - at)
            # In place, with numpy scalars: each temporary array or Python-int operand
            # costs about as much as the arithmetic on a block this size.
            mixed = np.bitwise_xor(
                _TABLE[at : at + take], np.uint64(self._key(_TOKEN_STREAM, block))
            )
            mixed *= _MIX
            mixed >>= _HIGH
            mixed %= vocab
            # Below the vocabulary size, so each uint64 has an int64's bytes.
            ids.frombytes(mixed.tobytes())
            self._drawn += take
        ids.reverse()
        if self._eos.isdisjoint(ids):
            return ids
        return array("q", [self._not_eos(i) for i in ids])

    def _not_eos(self, token: int) -> int:
        """Move an EOS draw to the next non-EOS id, wrapping inside the vocabulary."""
        while token in self._eos:
            token = (token + 1) % self._vocab
        return token

    def natural_length(self, low: int, high: int) -> int:
        """Where an unconstrained sample would end: uniform in [low, high]."""
        return low + self._key(_LENGTH_STREAM, 0) % (high - low + 1)

    def accepted_drafts(self, draft_tokens: int, acceptance: float) -> int:
        """Drafts accepted before the first rejection, each with probability `acceptance`."""
        accepted = 0
        while accepted < draft_tokens and self._uniform_draw() < acceptance:
            accepted += 1
        return accepted

    def _uniform_draw(self) -> float:
        self._drafts += 1
        return (self._key(_DRAFT_STREAM, self._drafts) >> 11) * 2.0**-53


class CompiledTokenSource(TokenSource):
    """`TokenSource` drawing its blocks of ids in the compiled kernel (`_kernel.draw_ids`):
    the same ids, written straight into an array, without a numpy call per block."""

    def _draw(self, n: int) -> array[int]:
        assert kernel.compiled is not None
        ids = _ONE_ID * n
        kernel.compiled.draw_ids(_TABLE, self._drawn, self._seed, self._vocab, self._eos, ids)
        self._drawn += n
        return ids


def token_source_class() -> type[TokenSource]:
    """The compiled draws where the kernel is on (`kernel.enabled`), else the reference."""
    return CompiledTokenSource if kernel.enabled() else TokenSource
